"""Tests for semifer.data.augment (batched weak / strong views)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from semifer.data.augment import (
    FILL,
    GEOMETRIC_OPS,
    RANDAUGMENT_OPS,
    AugmentConfig,
    apply_cutout,
    apply_op,
    draw_randaugment,
    eval_view,
    randaugment,
    reframe_view,
    strong_view,
    to_float,
    weak_view,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_images(b: int, c: int, size: int = 48, seed: int = 0, symmetric: bool = False) -> torch.Tensor:
    """Smooth uint8 images (upsampled noise), so small shifts change little.

    ``symmetric`` makes them left-right symmetric like faces, so flips change little too.
    """
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, c, 4 if symmetric else 6, 4 if symmetric else 6, generator=g)
    if symmetric:
        low = (low + low.flip(-1)) / 2
    img = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (img * 255).round().to(torch.uint8)


def noise_images(b: int, c: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, size, size), generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------------------- basics


def test_to_float_and_eval_view():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    y = to_float(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y.flatten(), torch.tensor([0.0, 0.2, 1.0]))
    f = torch.rand(2, 3, 4, 4)
    assert to_float(f) is f  # float passes through
    assert torch.equal(eval_view(x), y)
    with pytest.raises(TypeError):
        to_float(torch.zeros(1, 1, 2, 2, dtype=torch.int32))


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("view", ["eval", "weak", "strong"])
def test_dtype_shape_range(c, view):
    x = noise_images(16, c, 40)
    if view == "eval":
        y = eval_view(x)
    elif view == "weak":
        y = weak_view(x, gen())
    else:
        y = strong_view(x, gen())
    assert y.dtype == torch.float32
    assert y.shape == x.shape
    assert y.device == x.device
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert torch.isfinite(y).all()


def test_non_square_and_empty_batch():
    x = noise_images(4, 3, 40)[:, :, :, :28].contiguous()
    assert strong_view(x, gen()).shape == x.shape
    assert weak_view(x, gen()).shape == x.shape
    empty = torch.zeros(0, 3, 16, 16, dtype=torch.uint8)
    assert strong_view(empty, gen()).shape == empty.shape
    assert weak_view(empty, gen()).shape == empty.shape


# ----------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("fn", [weak_view, strong_view, reframe_view])
def test_same_seed_same_output_other_seed_differs(fn):
    x = noise_images(32, 3)
    a = fn(x, gen(1))
    b = fn(x, gen(1))
    c = fn(x, gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generator_state_continues_deterministically():
    """Resuming from a saved generator state reproduces the next batches exactly."""
    x = noise_images(8, 3)
    g = gen(3)
    strong_view(x, g)
    state = g.get_state()
    first = [strong_view(x, g), weak_view(x, g)]
    g2 = torch.Generator()
    g2.set_state(state)
    second = [strong_view(x, g2), weak_view(x, g2)]
    assert all(torch.equal(p, q) for p, q in zip(first, second))


def test_global_rng_untouched():
    x = noise_images(8, 3)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    weak_view(x, gen())
    strong_view(x, gen())
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("fn", [weak_view, strong_view, reframe_view])
def test_per_sample_randomness(fn):
    x = smooth_images(1, 3).expand(32, -1, -1, -1).contiguous()
    y = fn(x, gen(5)).flatten(1)
    distinct = torch.unique(y, dim=0).shape[0]
    assert distinct >= 16, distinct


def test_strong_without_ops_and_cutout_equals_weak():
    """strong_view starts with exactly the weak view's draws."""
    x = noise_images(16, 3)
    s = strong_view(x, gen(7), num_ops=0, cutout=0.0)
    w = weak_view(x, gen(7))
    assert torch.equal(s, w)


# ----------------------------------------------------------------------------- weak view


@pytest.mark.parametrize("c", [1, 3])
def test_weak_flip_only_is_image_or_mirror(c):
    x = noise_images(64, c)
    xf = to_float(x)
    y = weak_view(x, gen(), max_shift=0.0)
    same = (y == xf).flatten(1).all(1)
    mirrored = (y == xf.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert bool(same.any()) and bool(mirrored.any())


def test_weak_no_flip_no_shift_is_identity():
    x = noise_images(8, 3)
    assert torch.equal(weak_view(x, gen(), flip=False, max_shift=0.0), to_float(x))


def test_weak_shift_is_reflect_padded_crop():
    size, shift = 32, 0.125
    p = int(shift * size)
    x = noise_images(64, 3, size)
    y = weak_view(x, gen(11), flip=False, max_shift=shift)
    padded = F.pad(to_float(x), (p, p, p, p), mode="reflect")
    found = set()
    for i in range(x.shape[0]):
        match = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(padded[i, :, dy : dy + size, dx : dx + size], y[i])
        ]
        assert match, f"sample {i} is not a reflect-padded crop"
        found.add(match[0])
    assert len(found) > 10  # offsets really vary per sample


# ----------------------------------------------------------------------------- strong view


def test_strong_differs_more_than_weak():
    x = smooth_images(64, 3, symmetric=True)
    xf = to_float(x)
    w = weak_view(x, gen(0))
    s = strong_view(x, gen(0))
    d_weak = (w - xf).abs().mean()
    d_strong = (s - xf).abs().mean()
    d_strong_weak = (s - w).abs().mean()  # same seed: only the RandAugment + Cutout part
    assert d_strong > 1.5 * d_weak, (d_strong, d_weak)
    assert d_strong_weak > d_weak, (d_strong_weak, d_weak)


def test_strong_grey_input():
    x = smooth_images(64, 1)
    s = strong_view(x, gen(1))
    assert s.shape == x.shape and (s - to_float(x)).abs().mean() > 0.05


def test_float_input_matches_uint8_input():
    x = noise_images(32, 3)
    xf = to_float(x)
    before = xf.clone()
    assert torch.equal(weak_view(xf, gen(4)), weak_view(x, gen(4)))
    assert torch.equal(strong_view(xf, gen(4)), strong_view(x, gen(4)))
    assert torch.equal(xf, before)  # input not modified in place


def test_augment_config_matches_functions():
    cfg = AugmentConfig(num_ops=3, magnitude_max=0.5, cutout=0.25, max_shift=0.1)
    x = noise_images(8, 3)
    expected = strong_view(x, gen(2), num_ops=3, magnitude_max=0.5, cutout=0.25, max_shift=0.1)
    assert torch.equal(cfg.strong(x, gen(2)), expected)
    assert torch.equal(cfg.weak(x, gen(2)), weak_view(x, gen(2), max_shift=0.1))
    assert torch.equal(cfg.eval(x), eval_view(x))


def test_batched_randaugment_equals_per_sample_ops():
    """The sort-by-op batching gives the same result as applying ops one sample at a time."""
    n = len(RANDAUGMENT_OPS)
    b = 2 * n
    x = to_float(smooth_images(b, 3, 32))
    g = gen(9)
    ops = torch.arange(b) % n  # every op, twice, interleaved
    m = (torch.rand(b, generator=g) * 2 - 1).clamp(-1, 1)
    y = randaugment(x, ops.view(b, 1), m.view(b, 1))
    for i in range(b):
        ref = apply_op(RANDAUGMENT_OPS[int(ops[i])], x[i : i + 1], m[i : i + 1])
        assert torch.allclose(y[i : i + 1], ref, atol=1e-5), RANDAUGMENT_OPS[int(ops[i])]
    # Two photometric slots: sequential application, per sample.
    ph = torch.tensor([i for i, name in enumerate(RANDAUGMENT_OPS) if name not in GEOMETRIC_OPS])
    ops2 = torch.stack([ph[torch.arange(b) % len(ph)], ph[(torch.arange(b) * 5 + 3) % len(ph)]], 1)
    m2 = torch.rand(b, 2, generator=g) * 2 - 1
    y2 = randaugment(x, ops2, m2)
    for i in range(b):
        ref = x[i : i + 1]
        for k in range(2):
            ref = apply_op(RANDAUGMENT_OPS[int(ops2[i, k])], ref, m2[i, k : k + 1])
        assert torch.allclose(y2[i : i + 1], ref, atol=1e-5)


def test_geometric_ops_compose_in_order():
    """Geometric slots fuse into one warp equal to applying them one after another."""
    size = 48
    x = to_float(smooth_images(2, 3, size))
    tx, rot = RANDAUGMENT_OPS.index("TranslateX"), RANDAUGMENT_OPS.index("Rotate")
    t = 6 / (0.3 * size)  # 6 px: the sequential reference then has one exact and one bilinear step
    ops = torch.tensor([[tx, rot], [rot, tx]])
    m = torch.tensor([[t, 0.8], [0.8, t]])
    y = randaugment(x, ops, m)
    centre = (..., slice(16, 32), slice(16, 32))  # away from where the fill differs
    for i in range(2):
        ref = x[i : i + 1]
        for k in range(2):
            ref = apply_op(RANDAUGMENT_OPS[int(ops[i, k])], ref, m[i, k : k + 1])
        assert torch.allclose(y[i : i + 1][centre], ref[centre], atol=1e-4), i
    assert not torch.allclose(y[0][centre], y[1][centre], atol=1e-3)  # order matters


def test_draw_randaugment_distribution():
    ops, m = draw_randaugment(7000, gen(0), num_ops=2, magnitude_max=0.8)
    assert ops.shape == m.shape == (7000, 2) and ops.dtype == torch.int64
    counts = torch.bincount(ops.flatten(), minlength=len(RANDAUGMENT_OPS))
    assert counts.numel() == len(RANDAUGMENT_OPS)
    assert bool((counts > 800).all() and (counts < 1200).all()), counts  # expected 1000 each
    a = m.abs()
    assert float(a.min()) > 0.0 and float(a.max()) <= 0.8
    assert abs(float(a.mean()) - 0.4) < 0.02  # uniform on (0, 0.8]
    assert abs(float((m > 0).float().mean()) - 0.5) < 0.03  # both directions
    assert (ops[:, 0] != ops[:, 1]).float().mean() > 0.8  # slots drawn independently


def test_strong_view_is_weak_then_randaugment_then_cutout():
    x = noise_images(32, 3)
    g = gen(6)
    w = weak_view(x, g)
    ops, m = draw_randaugment(32, g, num_ops=3, magnitude_max=0.7)
    expected = randaugment(w, ops, m)
    got = strong_view(x, gen(6), num_ops=3, magnitude_max=0.7, cutout=0.0)
    assert torch.equal(got, expected)
    with_cutout = strong_view(x, gen(6), num_ops=3, magnitude_max=0.7, cutout=0.5)
    differs = with_cutout != expected
    assert bool((with_cutout[differs] == FILL).all())  # Cutout only adds grey pixels


def test_all_ops_get_drawn():
    """Ops are drawn uniformly: with a big batch, every op changes some sample."""
    x = smooth_images(1, 3).expand(512, -1, -1, -1).contiguous()
    y = strong_view(x, gen(0), num_ops=1, cutout=0.0, flip=False, max_shift=0.0)
    unchanged = (y == to_float(x)).flatten(1).all(1).float().mean()
    # Identity (1/14) plus rare no-op draws; far below 1 and above 0.
    assert 0.02 < float(unchanged) < 0.2, float(unchanged)


# ----------------------------------------------------------------------------- single ops


@pytest.mark.parametrize("name", RANDAUGMENT_OPS)
@pytest.mark.parametrize("c", [1, 3])
def test_every_op_shape_range(name, c):
    x = to_float(noise_images(4, c, 24))
    y = apply_op(name, x, torch.tensor([-1.0, -0.3, 0.5, 1.0]))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_unknown_op():
    with pytest.raises(KeyError):
        apply_op("Invert", torch.rand(1, 3, 8, 8), 1.0)


def test_identity():
    x = to_float(noise_images(4, 3))
    assert torch.equal(apply_op("Identity", x, 1.0), x)


def test_solarize():
    x = to_float(noise_images(4, 3))
    assert torch.allclose(apply_op("Solarize", x, 1.0), 1.0 - x)  # threshold 0: all inverted
    y = apply_op("Solarize", x, 0.3)  # threshold 0.7
    bright = x >= 0.7
    assert torch.allclose(y[bright], 1.0 - x[bright])
    assert torch.equal(y[~bright], x[~bright])


def test_posterize():
    x = to_float(noise_images(4, 3))
    y = apply_op("Posterize", x, 1.0)  # 4 bits kept
    levels = y * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert torch.unique(levels.round()).numel() <= 16
    assert torch.all(levels.round() % 16 == 0)
    assert torch.unique(x).numel() > 100
    assert torch.allclose(apply_op("Posterize", x, 0.05), x)  # 8 bits kept: unchanged


def _pil_equalize_reference(channel: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize on one uint8 channel, written plainly."""
    hist = torch.bincount(channel.flatten().long(), minlength=256).tolist()
    nonzero = [h for h in hist if h]
    step = (sum(nonzero) - nonzero[-1]) // 255
    if step == 0:
        return channel.clone()
    lut, n = [], step // 2
    for h in hist:
        lut.append(min(255, n // step))
        n += h
    return torch.tensor(lut, dtype=torch.uint8)[channel.long()]


def test_equalize_spreads_histogram_and_matches_pil():
    x = (noise_images(4, 3) // 8 + 100).to(torch.uint8)  # values 100..131
    x[1, 2] = 77  # constant channel
    x[2, 0, :, :16] = 200  # two levels only
    y = apply_op("Equalize", x, 0.0)
    assert float(x[0].float().max() - x[0].float().min()) / 255 < 0.13
    spread = y[0].amax(dim=(1, 2)) - y[0].amin(dim=(1, 2))
    assert bool((spread > 0.9).all())
    y8 = (y * 255).round().to(torch.uint8)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            assert torch.equal(y8[i, c], _pil_equalize_reference(x[i, c])), (i, c)


def test_autocontrast():
    x = to_float(noise_images(4, 3)) * 0.5 + 0.2
    y = apply_op("AutoContrast", x, 0.0)
    assert torch.allclose(y.amin(dim=(2, 3)), torch.zeros(4, 3), atol=1e-6)
    assert torch.allclose(y.amax(dim=(2, 3)), torch.ones(4, 3), atol=1e-6)
    const = torch.full((1, 3, 8, 8), 0.3)
    assert torch.equal(apply_op("AutoContrast", const, 0.0), const)


def test_brightness():
    x = to_float(noise_images(2, 3))
    assert torch.allclose(apply_op("Brightness", x, -1.0), x * 0.1, atol=1e-6)
    assert torch.allclose(apply_op("Brightness", x, 1.0), (x * 1.9).clamp(0, 1), atol=1e-6)


def test_color():
    x = to_float(noise_images(2, 3))
    y = apply_op("Color", x, -1.0)  # saturation factor 0.1
    assert (y.std(dim=1).mean()) < 0.2 * x.std(dim=1).mean()
    grey = to_float(noise_images(2, 1))
    assert torch.equal(apply_op("Color", grey, -1.0), grey)


def test_contrast():
    x = to_float(smooth_images(2, 3))
    y = apply_op("Contrast", x, -1.0)  # factor 0.1 towards the mean grey level
    assert torch.allclose(y.std(dim=(1, 2, 3)), 0.1 * x.std(dim=(1, 2, 3)), rtol=0.05)
    z = apply_op("Contrast", x, 0.5)
    assert bool((z.std(dim=(1, 2, 3)) > x.std(dim=(1, 2, 3))).all())


def test_sharpness():
    x = to_float(noise_images(2, 3))

    def roughness(t):
        return (t[..., 1:, :] - t[..., :-1, :]).abs().mean()

    blurred = apply_op("Sharpness", x, -1.0)
    sharp = apply_op("Sharpness", x, 1.0)
    assert roughness(blurred) < roughness(x) < roughness(sharp)
    assert torch.equal(blurred[..., 0, :], x[..., 0, :])  # border untouched, like PIL
    const = torch.full((1, 3, 8, 8), 0.6)
    assert torch.allclose(apply_op("Sharpness", const, 1.0), const, atol=1e-6)


@pytest.mark.parametrize("axis", ["X", "Y"])
def test_translate_integer_shift(axis):
    size = 40
    x = to_float(noise_images(2, 3, size))
    shift = 6  # pixels: magnitude * 0.3 * size
    y = apply_op(f"Translate{axis}", x, torch.tensor([shift / (0.3 * size), -shift / (0.3 * size)]))
    dim = 3 if axis == "X" else 2
    for i, sign in ((0, 1), (1, -1)):
        # Output pixel j samples input j + sign * shift; the rest is grey fill.
        ref = torch.full_like(x[i], FILL)
        src = x[i].narrow(dim - 1, shift, size - shift) if sign > 0 else x[i].narrow(dim - 1, 0, size - shift)
        if sign > 0:
            ref.narrow(dim - 1, 0, size - shift).copy_(src)
        else:
            ref.narrow(dim - 1, shift, size - shift).copy_(src)
        assert torch.allclose(y[i], ref, atol=1e-5)


def test_shear_moves_along_the_right_axis():
    size = 32
    ramp = torch.linspace(0, 1, size)
    rows_vary = ramp.view(1, 1, size, 1).expand(1, 3, size, size).contiguous()  # constant along x
    cols_vary = ramp.view(1, 1, 1, size).expand(1, 3, size, size).contiguous()  # constant along y
    centre = slice(size // 2 - 4, size // 2 + 4)
    # Shearing along x moves pixels along rows: an image constant along rows keeps its centre.
    sx = apply_op("ShearX", rows_vary, 1.0)
    assert torch.allclose(sx[..., centre, centre], rows_vary[..., centre, centre], atol=1e-5)
    assert not torch.allclose(apply_op("ShearX", cols_vary, 1.0), cols_vary, atol=1e-2)
    sy = apply_op("ShearY", cols_vary, 1.0)
    assert torch.allclose(sy[..., centre, centre], cols_vary[..., centre, centre], atol=1e-5)
    assert not torch.allclose(apply_op("ShearY", rows_vary, 1.0), rows_vary, atol=1e-2)


@pytest.mark.parametrize("width", [49, 69])  # also non-square: no anisotropic distortion
def test_rotate_moves_a_blob_by_30_degrees(width):
    size, oy, ox = 49, 24, (width - 1) // 2  # centre pixel
    x = torch.zeros(2, 1, size, width)
    x[:, :, oy - 1 : oy + 2, ox + 15 : ox + 18] = 1.0  # blob 16 px right of the centre
    y = apply_op("Rotate", x, torch.tensor([1.0, -1.0]))
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(width).float(), indexing="ij")
    # Inside a disc of radius 20 there is no grey fill, only the (rotated) blob.
    inside = torch.where((yy - oy) ** 2 + (xx - ox) ** 2 < 20**2, y[:, 0], torch.zeros_like(y[:, 0]))
    w = inside.sum(dim=(1, 2))
    cy = (inside * yy).sum(dim=(1, 2)) / w - oy
    cx = (inside * xx).sum(dim=(1, 2)) / w - ox
    angles = torch.rad2deg(torch.atan2(cy, cx))
    assert torch.allclose(angles.abs(), torch.full((2,), 30.0), atol=1.5), angles
    assert float(angles[0] * angles[1]) < 0  # opposite signs rotate opposite ways
    assert torch.allclose(torch.hypot(cy, cx), torch.full((2,), 16.0), atol=0.5)
    corner = y[0, :, 0, 0]
    assert torch.allclose(corner, torch.full_like(corner, FILL), atol=1e-5)  # grey fill


def test_geometric_zero_magnitude_is_identity():
    x = to_float(noise_images(2, 3))
    for name in sorted(GEOMETRIC_OPS):
        assert torch.allclose(apply_op(name, x, 0.0), x, atol=1e-5), name


# ----------------------------------------------------------------------------- cutout


def _is_filled_rectangle(mask: torch.Tensor) -> bool:
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    return bool(mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()) and int(mask.sum()) == (
        len(rows) * len(cols)
    )


@pytest.mark.parametrize("via", ["strong", "helper"])
def test_cutout_grey_square(via):
    size, frac, b = 40, 0.5, 64
    x = torch.zeros(b, 3, size, size, dtype=torch.uint8)  # black: grey pixels can only come from Cutout
    if via == "strong":
        y = strong_view(x, gen(3), num_ops=0, cutout=frac, flip=False, max_shift=0.0)
    else:
        y = apply_cutout(x, gen(3), frac)
    grey = y == FILL
    assert bool((grey | (y == 0)).all())
    assert bool((grey.all(1) == grey.any(1)).all())  # same square in every channel
    squares = 0
    for i in range(b):
        m = grey[i, 0]
        if not m.any():
            continue
        squares += 1
        assert _is_filled_rectangle(m)
        h = int(m.any(1).sum())
        w = int(m.any(0).sum())
        assert max(h, w) <= math.floor(frac * size)
        # Not clipped by a border -> a square.
        if not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()):
            assert h == w
    assert squares > b // 2
    sides = grey[:, 0].any(2).sum(1).float()
    assert sides.std() > 1.0  # random size per sample


# ----------------------------------------------------------------------------- device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_same_contract_and_same_ops_as_cpu():
    dev = torch.device("cuda")
    x = noise_images(64, 3).to(dev)
    g = torch.Generator(device=dev)
    a = strong_view(x, g.manual_seed(1))
    b = strong_view(x, g.manual_seed(1))
    assert a.device.type == "cuda" and a.dtype == torch.float32 and torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert weak_view(x, g.manual_seed(1)).device.type == "cuda"
    # Given the same parameters, the ops agree with the CPU implementation.
    ops, m = draw_randaugment(64, gen(2), num_ops=2)
    cpu = randaugment(to_float(x.cpu()), ops, m)
    gpu = randaugment(to_float(x), ops.to(dev), m.to(dev))
    # Float rounding may differ across devices, which can flip a quantisation step
    # (Equalize/Posterize/Solarize in the 2nd slot) for a rare pixel: compare loosely.
    diff = (gpu.cpu() - cpu).abs()
    assert float(diff.mean()) < 1e-4 and float((diff > 1e-3).float().mean()) < 1e-3


# ----------------------------------------------------------------------------- reframe view


def test_reframe_view_is_the_weak_view_then_a_zoom_and_rotation():
    x = smooth_images(16, 1, symmetric=True)
    # zoom 1 and no rotation: exactly the weak view (the warp of the identity, up to interpolation)
    ident = reframe_view(x, gen(4), zoom=1.0, rotate_deg=0.0)
    assert torch.allclose(ident, weak_view(x, gen(4)), atol=1e-5)
    # zoom out by exactly 2 (zoom range [2, 2] is not possible, so check the bounds instead):
    # with zoom 2, the grey border shows on samples that were shrunk, never more than half the side
    big = reframe_view(x, gen(4), zoom=2.0, rotate_deg=0.0)
    grey = (big == FILL).all(1)                  # (B, H, W) pixels left uncovered
    rows_grey = grey.all(2).sum(1)               # fully grey rows per sample
    assert rows_grey.max() <= 24 + 1 and rows_grey.max() > 0
    assert not torch.allclose(big, ident)
    # rotation only: a centred bright bar tilts by at most rotate_deg
    bar = torch.zeros(64, 1, 48, 48, dtype=torch.uint8)
    bar[:, :, 22:26, 4:44] = 255
    turned = reframe_view(bar, gen(5), zoom=1.0, rotate_deg=10.0, flip=False, max_shift=0.0)
    ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    angles = []
    for img in turned[:, 0]:
        w = (img > 0.75).float()
        mx, my = (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()
        cov = torch.stack([((w * (xs - mx) * (xs - mx)).sum()), ((w * (xs - mx) * (ys - my)).sum()),
                           ((w * (ys - my) * (ys - my)).sum())]) / w.sum()
        angles.append(math.degrees(0.5 * math.atan2(2 * cov[1], cov[0] - cov[2])))
    angles = torch.tensor(angles).abs()
    assert angles.max() <= 10.5 and angles.max() > 5


def test_reframe_is_a_labeled_augment_choice():
    import typing

    from semifer.config import DataConfig
    from semifer.engine.loop import LABELED_VIEWS

    assert LABELED_VIEWS["reframe"] is reframe_view
    # every choice the config accepts has a view, and no view is unreachable
    assert set(LABELED_VIEWS) == set(typing.get_args(typing.get_type_hints(DataConfig)["labeled_augment"]))
