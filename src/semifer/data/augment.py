"""Batched weak / strong views for FixMatch-style semi-supervised training.

Everything here works on a whole batch ``(B, C, H, W)`` at once, on any device,
with *per-sample* random parameters (torchvision's transforms draw one parameter
per call, which would give every image in a batch the same transform).

All randomness comes from an explicit ``torch.Generator`` and every call draws
a fixed number of random values whose shape depends only on the batch shape and
the knobs, never on what was drawn; so the same generator state always gives the
same output (exact resume of training relies on this).

Outputs are float in ``[0, 1]``; mean/std normalisation belongs to the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F

__all__ = [
    "RANDAUGMENT_OPS",
    "AugmentConfig",
    "FILL",
    "GEOMETRIC_OPS",
    "apply_cutout",
    "apply_op",
    "draw_randaugment",
    "eval_view",
    "randaugment",
    "reframe_view",
    "strong_view",
    "to_float",
    "weak_view",
]

RANDAUGMENT_OPS: tuple[str, ...] = (
    "Identity",
    "AutoContrast",
    "Brightness",
    "Color",
    "Contrast",
    "Equalize",
    "Posterize",
    "Rotate",
    "Sharpness",
    "ShearX",
    "ShearY",
    "Solarize",
    "TranslateX",
    "TranslateY",
)
_OP_INDEX = {name: i for i, name in enumerate(RANDAUGMENT_OPS)}
GEOMETRIC_OPS: frozenset[str] = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})
_GEO_IDS = tuple(sorted(_OP_INDEX[n] for n in GEOMETRIC_OPS))

# Ranges at magnitude 1 (FixMatch / torchvision RandAugment conventions).
MAX_ROTATE_DEG = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3  # fraction of the image size
MAX_ENHANCE = 0.9  # enhancement factor in [1 - 0.9, 1 + 0.9]
MAX_POSTERIZE_DROP = 4  # bits removed at magnitude 1 (8 -> 4 bits)
FILL = 0.5  # grey for pixels uncovered by geometric ops and for Cutout


# ----------------------------------------------------------------------------- basics


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; floating tensors pass through unchanged."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if x.is_floating_point():
        return x
    raise TypeError(f"expected uint8 or floating images, got {x.dtype}")


def eval_view(x: torch.Tensor) -> torch.Tensor:
    """The un-augmented view used for evaluation: just :func:`to_float`."""
    return to_float(x)


def _check(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")


def _rand(generator: torch.Generator, *shape: int, device: torch.device,
          shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Uniforms of ``shape``, batch along dim 1.

    ``shard=(rank, world)``: drawn for the ``world`` x larger global batch and sliced to this
    rank's part, so DDP ranks sharing one generator seed give each sample the draws a single
    process with the whole global batch would (world 1 draws exactly as before).
    """
    rank, world = shard
    if world == 1:
        return torch.rand(shape, generator=generator, device=device)
    full = (shape[0], shape[1] * world, *shape[2:])
    return torch.rand(full, generator=generator, device=device).narrow(1, rank * shape[1], shape[1])


def _col(v: torch.Tensor) -> torch.Tensor:
    """(n,) -> (n, 1, 1, 1) for broadcasting against images."""
    return v.view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- weak view


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Map out-of-range indices back into [0, n) by mirror reflection (edge not repeated)."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


def weak_view(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    flip: bool = True,
    max_shift: float = 0.125,
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """Per-sample random horizontal flip (p=0.5) and integer translation.

    The translation is uniform in ``[-p, p]`` pixels per axis with
    ``p = int(max_shift * size)`` and reflect padding, i.e. FixMatch's
    pad-and-random-crop. It is done as one index gather on the input dtype (so
    uint8 stays cheap and the result is exact: no interpolation), then converted
    with :func:`to_float`. Draws 3*B uniforms from ``generator`` whatever the knobs.
    """
    _check(x)
    b, c, h, w = x.shape
    dev = x.device
    # Always draw the same amount so that the generator stream does not depend on the knobs.
    u = _rand(generator, 3, b, device=dev, shard=shard)
    if b == 0:
        return to_float(x)
    ph, pw = int(max_shift * h), int(max_shift * w)
    dy = torch.floor(u[0] * (2 * ph + 1)).long() - ph
    dx = torch.floor(u[1] * (2 * pw + 1)).long() - pw
    rows = _reflect(torch.arange(h, device=dev).unsqueeze(0) + dy.unsqueeze(1), h)  # (B, H)
    cols = _reflect(torch.arange(w, device=dev).unsqueeze(0) + dx.unsqueeze(1), w)  # (B, W)
    if flip:
        cols = torch.where((u[2] < 0.5).unsqueeze(1), cols.flip(1), cols)
    idx = (rows.unsqueeze(2) * w + cols.unsqueeze(1)).view(b, 1, h * w).expand(b, c, h * w)
    out = x.reshape(b, c, h * w).gather(2, idx).view(b, c, h, w)
    return to_float(out)


# ----------------------------------------------------------------------------- reframe view

# How far a detector's crop of a new photo moves from a data set's own framing. Measured on the
# 1,437 held-out FER2013 train faces pasted into photos and cropped by predict's path
# (benchmarks/pasted_faces.py): the crop is 0.80-1.29 times the original's side (10th-90th
# percentile) and shifted by up to about 15 % of it.
REFRAME_ZOOM = 1.25
REFRAME_ROTATE_DEG = 10.0


def reframe_view(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    zoom: float = REFRAME_ZOOM,
    rotate_deg: float = REFRAME_ROTATE_DEG,
    flip: bool = True,
    max_shift: float = 0.125,
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """The weak view, then a per-sample zoom (log-uniform in [1/zoom, zoom]) and rotation (uniform
    in +-rotate_deg) about the centre: the framing differences a face detector's crop brings,
    without RandAugment's photometric ops. Uncovered pixels are grey. Draws 3*B uniforms (weak
    view) then 2*B."""
    _check(x)
    x = weak_view(x, generator, flip=flip, max_shift=max_shift, shard=shard)
    b, _, h, w = x.shape
    u = _rand(generator, 2, b, device=x.device, shard=shard)
    if b == 0:
        return x
    # output pixel -> input pixel: a zoom factor z > 1 enlarges the face, so input = output / z
    inv_zoom = torch.exp((2 * u[0] - 1) * math.log(zoom)).to(x.dtype)
    ang = torch.deg2rad((2 * u[1] - 1) * rotate_deg).to(x.dtype)
    cos, sin = torch.cos(ang) * inv_zoom, torch.sin(ang) * inv_zoom
    zero, one = torch.zeros_like(cos), torch.ones_like(cos)
    mats = torch.stack([cos, -sin, zero, sin, cos, zero, zero, zero, one], dim=1).view(-1, 3, 3)
    return _warp(x, mats)


# ----------------------------------------------------------------------------- photometric ops
# Each takes x (n, C, H, W) float in [0, 1], m (n,) magnitude in [0, 1] and s (n,) sign +-1.


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, (n, 1, H, W); C=1 is already grey."""
    if x.shape[1] == 3:
        return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    return x.mean(1, keepdim=True)


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance semantics: factor 0 -> degenerate, 1 -> x, >1 extrapolates."""
    return (degenerate + _col(factor) * (x - degenerate)).clamp_(0.0, 1.0)


def _factor(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (1.0 + s * MAX_ENHANCE * m).clamp(min=0.0)


def _to_levels(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0).round_().clamp_(0, 255)


def _identity(x, m, s):
    return x


def _autocontrast(x, m, s):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo  # constant channel: leave it alone (PIL does the same)
    scale = torch.where(flat, torch.ones_like(hi), 1.0 / (hi - lo).clamp(min=1e-12))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((x - lo) * scale).clamp_(0.0, 1.0)


def _brightness(x, m, s):
    return _blend(x, torch.zeros_like(x), _factor(m, s))


def _color(x, m, s):
    if x.shape[1] == 1:  # saturation is meaningless for grey images
        return x
    return _blend(x, _grey(x).expand_as(x), _factor(m, s))


def _contrast(x, m, s):
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean.expand_as(x), _factor(m, s))


def _equalize(x, m, s):
    """PIL/torchvision ``equalize`` per sample and channel on 256 levels, batched.

    Histograms of all (sample, channel) rows come from one ``scatter_add_``. Counts
    and LUT are kept in float32: every value is an integer below 2**24, so the
    arithmetic is exact and the result does not depend on summation order (hence
    deterministic on CUDA too), and float gathers are ~2x faster than int64 ones.
    """
    n, c, h, w = x.shape
    rows = n * c
    if rows == 0:
        return x
    q = _to_levels(x).long().view(rows, h * w)
    ones = torch.ones(1, 1, device=x.device, dtype=torch.float32).expand(rows, h * w)
    hist = torch.zeros(rows, 256, device=x.device, dtype=torch.float32).scatter_add_(1, q, ones)
    # PIL leaves the last non-empty bin out of the step.
    last = 255 - (hist > 0).flip(1).to(torch.uint8).argmax(1, keepdim=True)
    step = torch.floor((h * w - hist.gather(1, last)) / 255.0)
    cum = hist.cumsum(1) - hist  # pixels strictly below each level
    lut = torch.floor((cum + torch.floor(step / 2)) / step.clamp(min=1.0)).clamp_(max=255.0)
    # step == 0 (at most one level apart from the top one): PIL returns the image as is.
    lut = torch.where(step == 0, torch.arange(256, device=x.device, dtype=torch.float32), lut)
    return (lut.div_(255.0).gather(1, q)).to(x.dtype).view(n, c, h, w)


def _posterize(x, m, s):
    # Keep 8 - round(4 m) bits (8..4), as torchvision's RandAugment.
    step = torch.pow(2.0, torch.round(MAX_POSTERIZE_DROP * m)).to(x.dtype)
    step = _col(step)
    return torch.floor(_to_levels(x) / step) * step / 255.0


def _sharpness(x, m, s):
    n, c, h, w = x.shape
    if h < 3 or w < 3:
        return x
    # PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]]/13 as a separable 3x3 box sum
    # plus 4x centre (CPU conv2d with a 1-channel kernel is ~20x slower than this).
    # The 1-pixel border keeps its original value, like PIL.
    r = x[..., :, :-2] + x[..., :, 1:-1] + x[..., :, 2:]
    box = r[..., :-2, :] + r[..., 1:-1, :] + r[..., 2:, :]
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = (box + 4.0 * x[..., 1:-1, 1:-1]) / 13.0
    return _blend(x, degenerate, _factor(m, s))


def _solarize(x, m, s):
    # Threshold 1 - m: magnitude 1 inverts every pixel, small magnitudes only the brightest.
    thr = _col(1.0 - m).to(x.dtype)
    return torch.where(x >= thr, 1.0 - x, x)


_PHOTOMETRIC = {
    "Identity": _identity,
    "AutoContrast": _autocontrast,
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Equalize": _equalize,
    "Posterize": _posterize,
    "Sharpness": _sharpness,
    "Solarize": _solarize,
}
_OP_FNS = tuple(_PHOTOMETRIC.get(name) for name in RANDAUGMENT_OPS)  # None for geometric ops


# ----------------------------------------------------------------------------- geometric ops


def _geo_matrices(op: torch.Tensor, m: torch.Tensor, s: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Sampling matrices (n, 3, 3) for one op slot, output pixel -> input pixel.

    Coordinates are in pixels relative to the image centre, so that rotation and
    shear act about the centre and stay undistorted for H != W. Samples whose op
    is not geometric get the identity; no masking needed.
    """
    v = s * m
    ang = torch.deg2rad(v * MAX_ROTATE_DEG)
    cos, sin = torch.cos(ang), torch.sin(ang)
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    is_rot = op == _OP_INDEX["Rotate"]
    a = torch.where(is_rot, cos, one)
    b = torch.where(is_rot, -sin, torch.where(op == _OP_INDEX["ShearX"], v * MAX_SHEAR, zero))
    c = torch.where(is_rot, sin, torch.where(op == _OP_INDEX["ShearY"], v * MAX_SHEAR, zero))
    tx = torch.where(op == _OP_INDEX["TranslateX"], v * MAX_TRANSLATE * w, zero)
    ty = torch.where(op == _OP_INDEX["TranslateY"], v * MAX_TRANSLATE * h, zero)
    return torch.stack([a, b, tx, c, a, ty, zero, zero, one], dim=1).view(-1, 3, 3)


def _warp(x: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """Bilinear warp of x with per-sample pixel-space matrices; uncovered area is grey."""
    n, c, h, w = x.shape
    mats = mats.to(x.dtype)
    # Normalised output coordinates of pixel centres (align_corners=False); pixel
    # offsets from the centre are u = x_norm * W/2, so theta = S^-1 M S.
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) * 2 + 1) / h - 1
    sx, sy = w / 2.0, h / 2.0
    scale_in = torch.tensor([1.0 / sx, 1.0 / sy], device=x.device, dtype=x.dtype).view(1, 2, 1)
    scale_out = torch.tensor([sx, sy, 1.0], device=x.device, dtype=x.dtype).view(1, 1, 3)
    theta = mats[:, :2, :] * scale_in * scale_out  # (n, 2, 3): rows (x_in, y_in)
    # grid[n, i, j] = theta[n] @ (xs[j], ys[i], 1), built by broadcasting straight
    # into the (n, H, W, 2) layout (cheaper on CPU than F.affine_grid's bmm).
    grid = theta[:, :, 0].view(n, 1, 1, 2) * xs.view(1, 1, w, 1) + (
        theta[:, :, 1].view(n, 1, 1, 2) * ys.view(1, h, 1, 1) + theta[:, :, 2].view(n, 1, 1, 2)
    )
    # Sampling (x - fill) with zero padding then adding fill back = constant grey fill.
    out = F.grid_sample(x - FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.add_(FILL).clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------- public helpers


def apply_op(name: str, x: torch.Tensor, magnitude: torch.Tensor | float) -> torch.Tensor:
    """Apply one RandAugment op to every sample of a float batch (mainly for tests/inspection).

    ``magnitude`` is per sample (shape (B,)) or a scalar, in [-1, 1]: its absolute
    value scales the op's range (1 = the maximum above) and its sign picks the
    direction for signed ops (Brightness, Color, Contrast, Sharpness, Rotate,
    Shear*, Translate*); unsigned ops use the absolute value.
    """
    if name not in _OP_INDEX:
        raise KeyError(f"unknown op {name!r}; known: {', '.join(RANDAUGMENT_OPS)}")
    _check(x)
    x = to_float(x)
    mag = torch.as_tensor(magnitude, dtype=torch.float32, device=x.device).expand(x.shape[0])
    m = mag.abs()
    s = torch.where(mag < 0, -torch.ones_like(mag), torch.ones_like(mag))
    if name in GEOMETRIC_OPS:
        op = torch.full((x.shape[0],), _OP_INDEX[name], device=x.device)
        return _warp(x, _geo_matrices(op, m, s, x.shape[2], x.shape[3]))
    return _PHOTOMETRIC[name](x, m, s)


def _cutout_mask(u: torch.Tensor, frac_max: float, h: int, w: int) -> torch.Tensor:
    """(B, 1, H, W) bool mask of one square per sample from uniforms u (3, B)."""
    side = torch.floor(u[0] * frac_max * min(h, w))
    cy, cx = u[1] * h, u[2] * w
    # Box centred at a uniform point and clipped to the image (USB / FixMatch Cutout).
    y0 = torch.floor(cy - side / 2).clamp(min=0)
    x0 = torch.floor(cx - side / 2).clamp(min=0)
    y1, x1 = (y0 + side).clamp(max=h), (x0 + side).clamp(max=w)
    ar_h = torch.arange(h, device=u.device, dtype=u.dtype)
    ar_w = torch.arange(w, device=u.device, dtype=u.dtype)
    in_r = (ar_h >= y0.unsqueeze(1)) & (ar_h < y1.unsqueeze(1))  # (B, H)
    in_c = (ar_w >= x0.unsqueeze(1)) & (ar_w < x1.unsqueeze(1))  # (B, W)
    return (in_r.unsqueeze(2) & in_c.unsqueeze(1)).unsqueeze(1)


def apply_cutout(x: torch.Tensor, generator: torch.Generator, cutout: float = 0.5,
                 shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """One grey (0.5) square per sample, side ``uniform(0, cutout) * min(H, W)``, random centre."""
    _check(x)
    x = to_float(x)
    u = _rand(generator, 3, x.shape[0], device=x.device, shard=shard)
    if cutout <= 0 or x.shape[0] == 0:
        return x
    mask = _cutout_mask(u, cutout, x.shape[2], x.shape[3])
    return torch.where(mask, torch.full_like(x[:1, :1, :1, :1], FILL), x)


# ----------------------------------------------------------------------------- strong view


def randaugment(x: torch.Tensor, ops: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """Apply given per-sample op sequences to a float batch, batched (the strong-view engine).

    ``ops`` (B, K) holds indices into :data:`RANDAUGMENT_OPS`, ``magnitudes`` (B, K)
    signed magnitudes as in :func:`apply_op`. Per slot k, the batch is permuted so
    that samples with the same op are contiguous and each photometric op runs once
    on its chunk, in place (no per-sample Python loop). Geometric ops of all slots
    are composed into one affine matrix per sample and applied with a single
    ``grid_sample`` after the photometric ops (order within each family is kept;
    one interpolation instead of K). The batch is un-permuted once at the end.
    There is one device->host copy per call (of ``ops``), for the chunk sizes.
    """
    _check(x)
    x = to_float(x)
    b, _, h, w = x.shape
    if ops.shape != magnitudes.shape or ops.dim() != 2 or ops.shape[0] != b:
        raise ValueError(f"ops {tuple(ops.shape)} and magnitudes {tuple(magnitudes.shape)} must both be (B, K)")
    if b == 0 or ops.shape[1] == 0:
        return x
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    dev, n_ops, n_slots = x.device, len(RANDAUGMENT_OPS), ops.shape[1]
    ops = ops.to(dev)
    magnitudes = magnitudes.to(device=dev, dtype=torch.float32)
    mags = magnitudes.abs()
    signs = torch.where(magnitudes < 0, -torch.ones_like(mags), torch.ones_like(mags))
    ops_cpu = ops.cpu()
    if int(ops_cpu.min()) < 0 or int(ops_cpu.max()) >= n_ops:
        raise ValueError(f"op indices must be in [0, {n_ops})")

    mats = torch.eye(3, device=dev).expand(b, 3, 3)
    for k in range(n_slots):
        mats = mats @ _geo_matrices(ops[:, k], mags[:, k], signs[:, k], h, w)
    geo = torch.zeros(b, dtype=torch.bool)
    for i in _GEO_IDS:
        geo |= (ops_cpu == i).any(1)
    has_geo = bool(geo.any())

    # perm[p] = original index of the sample now at position p. Sorting by
    # (geo, op) keeps the samples to warp in one contiguous block after the last slot.
    perm = torch.arange(b)
    permuted = False
    for k in range(n_slots):
        key = ops_cpu[perm, k] + n_ops * geo[perm].long()
        counts = torch.bincount(key, minlength=2 * n_ops).tolist()
        photometric = any(counts[i] for i in range(2 * n_ops) if _OP_FNS[i % n_ops] not in (None, _identity))
        if not photometric and not (has_geo and k == n_slots - 1):
            continue  # nothing to do in this slot
        order = torch.argsort(key, stable=True)
        perm = perm[order]
        # index_select: a fresh tensor (safe to update in place below), and on CPU
        # ~5x faster than x[order].
        x = x.index_select(0, order.to(dev))
        permuted = True
        if not photometric:
            continue
        perm_dev = perm.to(dev)
        ms, ss = mags[perm_dev, k], signs[perm_dev, k]
        start = 0
        for i, cnt in enumerate(counts):
            fn = _OP_FNS[i % n_ops]
            if cnt and fn is not None and fn is not _identity:
                sl = slice(start, start + cnt)
                x[sl] = fn(x[sl], ms[sl], ss[sl])
            start += cnt

    if has_geo:
        # Only the samples that drew a geometric op are warped: exact pass-through
        # for the rest and less work (about 60% of samples with K=2).
        g0 = b - int(geo.sum())
        x[g0:] = _warp(x[g0:], mats[perm[g0:].to(dev)])
    if permuted:
        x = x.index_select(0, torch.argsort(perm).to(dev))
    return x


def draw_randaugment(
    batch: int,
    generator: torch.Generator,
    *,
    num_ops: int = 2,
    magnitude_max: float = 1.0,
    device: torch.device | str | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw per-sample RandAugment parameters for :func:`randaugment`.

    Returns ``ops`` (B, num_ops) int64, uniform over :data:`RANDAUGMENT_OPS`, and
    signed ``magnitudes`` (B, num_ops) with ``|m|`` uniform in (0, magnitude_max]
    and a random sign. Always consumes 3 * B * num_ops uniforms.
    """
    dev = generator.device if device is None else torch.device(device)
    n_ops = len(RANDAUGMENT_OPS)
    u = _rand(generator, 3, batch, num_ops, device=dev, shard=shard)
    ops = torch.floor(u[0] * n_ops).long().clamp_(max=n_ops - 1)
    mags = (1.0 - u[1]) * magnitude_max  # (0, magnitude_max]
    return ops, torch.where(u[2] < 0.5, -mags, mags)


def strong_view(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    num_ops: int = 2,
    magnitude_max: float = 1.0,
    cutout: float = 0.5,
    flip: bool = True,
    max_shift: float = 0.125,
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """Weak flip/shift, then per-sample RandAugment (random magnitude), then Cutout.

    Each sample draws ``num_ops`` ops uniformly (with replacement) from
    :data:`RANDAUGMENT_OPS`, each with magnitude uniform in (0, magnitude_max]
    and a random sign, applied by :func:`randaugment`; then one grey Cutout
    square (see :func:`apply_cutout`). The first draws are exactly those of
    :func:`weak_view`, then those of :func:`draw_randaugment`, then 3*B for
    Cutout; so ``strong_view(x, g, cutout=0)`` equals
    ``randaugment(weak_view(x, g), *draw_randaugment(B, g, ...))`` for the same
    generator state.
    """
    _check(x)
    x = weak_view(x, generator, flip=flip, max_shift=max_shift, shard=shard)
    b, _, h, w = x.shape
    ops, magnitudes = draw_randaugment(b, generator, num_ops=num_ops, magnitude_max=magnitude_max, device=x.device,
                                       shard=shard)
    u_cut = _rand(generator, 3, b, device=x.device, shard=shard)  # drawn even if cutout == 0: fixed stream
    if b == 0:
        return x
    x = randaugment(x, ops, magnitudes)
    if cutout > 0:
        # x is a fresh tensor made by weak_view/randaugment, so in-place is safe.
        x = x.masked_fill_(_cutout_mask(u_cut, cutout, h, w), FILL)
    return x


# ----------------------------------------------------------------------------- config


@dataclass
class AugmentConfig:
    """The augmentation knobs in one place (e.g. read from a config file)."""

    flip: bool = True
    max_shift: float = 0.125
    num_ops: int = 2
    magnitude_max: float = 1.0
    cutout: float = 0.5

    def weak(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return weak_view(x, generator, flip=self.flip, max_shift=self.max_shift)

    def strong(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return strong_view(
            x,
            generator,
            num_ops=self.num_ops,
            magnitude_max=self.magnitude_max,
            cutout=self.cutout,
            flip=self.flip,
            max_shift=self.max_shift,
        )

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        return eval_view(x)
