"""Synthetic demo faces: procedurally drawn cartoon faces with expressions.

These images are **synthetic**. Every face is drawn from a handful of
geometric primitives (ellipses, line segments, lip curves); nothing is
downloaded and no real person is depicted. They exist so that the
semi-supervised pipeline can be demonstrated and tested end to end on a
laptop CPU in a minute or two. Accuracy on them says nothing about accuracy
on real facial-expression data.

The data are built so that semi-supervised learning has something to gain:
the labeled split holds few images from few identities, while the unlabeled
split holds thousands of images from many other identities. Identity and
nuisance variation that a small labeled set cannot cover is covered by the
unlabeled faces.

Factors drawn per sample (all vectorised over the batch):

* identity (fixed per identity id): face width/height and jaw taper, skin
  tone, eye spacing, height and size, iris colour, brow length, thickness and
  height, hair colour, volume, length, hairline height and parting (or bald),
  glasses (rims, tinted lenses) on some identities, rosy cheeks, mouth
  position, width and lip thickness, background colours and texture, and a
  small "resting face" offset of every action unit;
* expression, as action-unit-like parameters (class prototype times a random
  intensity plus per-sample jitter): brow raise (AU1+2), brow lower (AU4),
  inner brow raise (AU1), eye openness (AU5 wide / AU7 narrowed), lip-corner
  pull (AU12 up / AU15 down), mouth opening (AU25/26/27), mouth stretch
  (AU20), nose wrinkle (AU9), lip press (AU24), upper-lip raise (AU10) and a
  one-sided corner pull (contempt-like asymmetry);
* nuisance (per image): in-plane rotation, scale, shift, a linear lighting
  ramp at a random angle plus global brightness, gaussian blur and gaussian
  noise.

Fear/Surprise and Anger/Disgust share action units and differ by weaker cues,
and "Other" mixes two other classes or shows an asymmetric expression, so a
fraction of samples is genuinely ambiguous.

Rendering: faces are drawn in a canonical (upright, centred) frame. The
expression features and glasses (small shapes, thin lines) are drawn at twice
the output resolution and area-downsampled; the large smooth shapes (hair,
head, neck, ears) use analytic 1-pixel edge coverage at output resolution and
are drawn once per identity. The composed face is then posed (rotation,
scale, shift; bilinear) over the background. Rendering is vectorised over
chunks of images; ``make_demo_splits()`` takes about 3 s on 2 CPU cores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from semifer.labels import ABAW_LABELS, NUM_CLASSES

__all__ = [
    "SyntheticSplit",
    "DEFAULT_UNLABELED_PRIOR",
    "render_faces",
    "make_demo_splits",
    "save_grid",
]

# Skewed like in-the-wild face collections: mostly neutral and happy faces.
DEFAULT_UNLABELED_PRIOR: tuple[float, ...] = (0.40, 0.06, 0.04, 0.05, 0.25, 0.08, 0.07, 0.05)

_SS = 2                 # supersampling factor: draw at 2x, area-downsample
_CHUNK = 256            # images rendered at once (bounds memory, stays cache-friendly)
_MAX_LABELED_PER_CLASS = 30

# Action-unit-like expression parameters (columns of the AU matrix).
_AUS = (
    "brow_raise",       # AU1+2: whole brow up
    "brow_lower",       # AU4: brows down and together
    "inner_raise",      # AU1: inner brow ends up
    "eye_open",         # AU5 (>0, wide) / AU7 (<0, narrowed)
    "lip_corner",       # AU12 (>0, smile) / AU15 (<0, corners down)
    "mouth_open",       # AU25/26/27
    "mouth_stretch",    # AU20 (>0, wide) / rounding (<0)
    "nose_wrinkle",     # AU9
    "lip_press",        # AU24
    "upper_lip_raise",  # AU10
    "asym",             # one-sided corner pull (contempt-like)
)
_A = {name: i for i, name in enumerate(_AUS)}
_N_AU = len(_AUS)


def _proto(**kw: float) -> list[float]:
    row = [0.0] * _N_AU
    for k, v in kw.items():
        row[_A[k]] = v
    return row


# Class prototypes in ABAW order. Fear/Surprise and Anger/Disgust deliberately
# share most of their action units.
_PROTOTYPES = torch.tensor([
    _proto(),                                                                   # Neutral
    _proto(brow_lower=1.0, lip_press=0.9, eye_open=-0.45, lip_corner=-0.15),     # Anger
    _proto(nose_wrinkle=1.0, brow_lower=0.6, upper_lip_raise=0.9,
           lip_corner=-0.45, eye_open=-0.35),                                    # Disgust
    _proto(brow_raise=0.6, inner_raise=0.8, eye_open=0.8, mouth_stretch=0.9,
           mouth_open=0.35, lip_corner=-0.2),                                    # Fear
    _proto(lip_corner=1.0, mouth_open=0.35, eye_open=-0.25),                     # Happiness
    _proto(inner_raise=1.0, lip_corner=-0.8, eye_open=-0.2, brow_lower=0.1),     # Sadness
    _proto(brow_raise=1.0, eye_open=0.9, mouth_open=0.9, mouth_stretch=-0.3),    # Surprise
    _proto(),                                                                   # Other (built per sample)
], dtype=torch.float32)
_OTHER = ABAW_LABELS.index("Other")

# Base colours (RGB in [0, 1]).
_SKIN_LIGHT = torch.tensor([0.97, 0.83, 0.72])
_SKIN_DARK = torch.tensor([0.33, 0.21, 0.14])
_HAIR_PALETTE = torch.tensor([
    [0.08, 0.06, 0.05], [0.22, 0.14, 0.08], [0.42, 0.27, 0.14], [0.80, 0.65, 0.38],
    [0.60, 0.25, 0.10], [0.62, 0.62, 0.62], [0.15, 0.15, 0.18],
])
_IRIS_PALETTE = torch.tensor([[0.30, 0.18, 0.08], [0.20, 0.40, 0.65], [0.30, 0.45, 0.25], [0.12, 0.08, 0.05]])


@dataclass
class SyntheticSplit:
    """One split of synthetic faces.

    ``labels`` is -1 for unlabeled images; ``true_labels`` always holds the
    class actually drawn and is meant for diagnostics only (for example
    pseudo-label accuracy), never for training.
    """

    images: torch.Tensor        # uint8 (N, 3, S, S), RGB
    labels: torch.Tensor        # int64 (N,)
    true_labels: torch.Tensor   # int64 (N,)
    identities: torch.Tensor    # int64 (N,)

    def __len__(self) -> int:
        return int(self.images.shape[0])


# --------------------------------------------------------------------------- RNG

def _generator(seed: int, *stream: int) -> torch.Generator:
    """A private generator for (seed, stream...); global RNG state is never touched."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(s) for s in stream]])
    g = torch.Generator()
    g.manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] & ((1 << 63) - 1)))
    return g


def _u(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


# ----------------------------------------------------------------- parameters

def _identity_params(count: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-identity appearance factors (one row per identity)."""
    p: dict[str, torch.Tensor] = {}
    p["fa"] = _u(g, count, 0.54, 0.68)          # face half-width
    p["fb"] = _u(g, count, 0.72, 0.84)          # face half-height
    p["jaw"] = _u(g, count, 0.05, 0.35)         # taper of the lower face
    t = torch.rand(count, generator=g) ** 0.9
    skin = _SKIN_LIGHT * (1 - t[:, None]) + _SKIN_DARK * t[:, None]
    p["skin"] = (skin * (1 + 0.06 * torch.randn(count, 3, generator=g))).clamp(0, 1)
    p["es"] = _u(g, count, 0.23, 0.32)          # eye half-spacing
    p["ey"] = _u(g, count, -0.15, -0.04)        # eye height
    p["ae"] = _u(g, count, 0.10, 0.14)          # eye half-width
    p["iris"] = _IRIS_PALETTE[torch.randint(len(_IRIS_PALETTE), (count,), generator=g)]
    p["bl"] = _u(g, count, 0.17, 0.26)          # brow length
    p["bt"] = _u(g, count, 0.010, 0.030)        # brow half-thickness
    p["bgap"] = _u(g, count, 0.14, 0.20)        # brow height above the eye
    hair = _HAIR_PALETTE[torch.randint(len(_HAIR_PALETTE), (count,), generator=g)]
    p["hair"] = (hair * (1 + 0.12 * torch.randn(count, 3, generator=g))).clamp(0, 1)
    p["brow_col"] = p["hair"] * 0.6 + 0.02
    p["hair_on"] = (torch.rand(count, generator=g) > 0.08).float()   # a few are bald
    p["hvol"] = _u(g, count, 0.02, 0.16)
    p["hlen"] = torch.where(torch.rand(count, generator=g) < 0.4,
                            _u(g, count, 0.3, 1.0), torch.zeros(count))
    p["hl0"] = _u(g, count, -0.66, -0.42)       # hairline height at the centre
    p["hcurv"] = _u(g, count, 0.3, 1.2)
    p["part"] = _u(g, count, -0.2, 0.2)
    p["glasses"] = (torch.rand(count, generator=g) < 0.25).float()
    p["tint"] = _u(g, count, 0.05, 0.45)
    p["rim_col"] = torch.rand(count, 1, generator=g) * torch.tensor([0.35, 0.3, 0.3]) + 0.02
    p["rosy"] = _u(g, count, 0.0, 0.25)
    p["my"] = _u(g, count, 0.38, 0.48)          # mouth height
    p["mw"] = _u(g, count, 0.17, 0.25)          # mouth half-width
    p["lt"] = _u(g, count, 0.018, 0.036)        # lip thickness
    p["lip_col"] = (0.65 * skin + 0.35 * torch.tensor([0.75, 0.25, 0.28])) * _u(g, count, 0.75, 1.0)[:, None]
    # Background: two colours mixed by a low-frequency pattern.
    # Muted colours: a saturated, high-contrast background is a distractor
    # that 25 labeled images per class cannot learn to ignore.
    grey = _u(g, count, 0.25, 0.85)[:, None]
    p["bg1"] = (grey + 0.45 * (torch.rand(count, 3, generator=g) - 0.5)).clamp(0, 1)
    p["bg2"] = (p["bg1"] + 0.12 * torch.randn(count, 3, generator=g)).clamp(0, 1)
    ang = _u(g, count, 0, 2 * math.pi)
    freq = _u(g, count, 0.5, 4.0)
    p["bg_fx"], p["bg_fy"] = freq * torch.cos(ang), freq * torch.sin(ang)
    p["bg_ph"] = _u(g, count, 0, 2 * math.pi)
    # Everybody has a slightly different resting face.
    p["rest"] = 0.05 * torch.randn(count, _N_AU, generator=g)
    return p


def _expression_aus(classes: torch.Tensor, rest: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-sample AU vectors: prototype * intensity + identity offset + jitter."""
    n = classes.numel()
    au = _PROTOTYPES[classes].clone()
    # "Other": half mixtures of two other classes, half asymmetric expressions.
    other = classes == _OTHER
    n_other = int(other.sum())
    if n_other:
        a = torch.randint(1, _OTHER, (n_other,), generator=g)          # never Neutral
        b = torch.randint(0, _OTHER - 1, (n_other,), generator=g)
        b = b + (b >= a).long()                                         # b != a
        w = _u(g, n_other, 0.35, 0.65)[:, None]
        mix = w * _PROTOTYPES[a] + (1 - w) * _PROTOTYPES[b]
        asym = torch.zeros(n_other, _N_AU)
        side = torch.where(torch.rand(n_other, generator=g) < 0.5, -1.0, 1.0)
        asym[:, _A["asym"]] = side * _u(g, n_other, 0.7, 1.1)
        asym[:, _A["lip_corner"]] = _u(g, n_other, -0.2, 0.2)
        asym[:, _A["eye_open"]] = _u(g, n_other, -0.3, 0.0)
        use_asym = (torch.rand(n_other, generator=g) < 0.5)[:, None]
        au[other] = torch.where(use_asym, asym, mix)
    intensity = _u(g, n, 0.8, 1.2)[:, None]
    au = au * intensity + rest + 0.08 * torch.randn(n, _N_AU, generator=g)
    return au.clamp(-1.5, 1.5)


def _nuisance(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-image nuisance factors."""
    q: dict[str, torch.Tensor] = {}
    q["rot"] = _u(g, n, -15, 15) * (math.pi / 180)
    q["scale"] = _u(g, n, 1.0, 1.2)            # >1 zooms in: tight crops like FER data
    q["tx"] = _u(g, n, -0.1, 0.1)               # about +-2.4 px at 48 px
    q["ty"] = _u(g, n, -0.1, 0.1)
    ang = _u(g, n, 0, 2 * math.pi)
    grad = _u(g, n, 0.0, 0.25)
    q["lx"], q["ly"] = grad * torch.cos(ang), grad * torch.sin(ang)
    q["gain"] = _u(g, n, 0.8, 1.1)
    q["blur"] = _u(g, n, 0.0, 1.0) * (torch.rand(n, generator=g) < 0.7).float()
    q["noise"] = _u(g, n, 0.0, 0.03)
    return q


# --------------------------------------------------------------- primitives

def _soft(d: torch.Tensor, px: float) -> torch.Tensor:
    """Analytic coverage from an (approximate) signed distance: a 1-pixel ramp."""
    return (0.5 - d / px).clamp_(0.0, 1.0)


def _ellipse(X, Y, cx, cy, a, b, px):
    # Distance approximated from the implicit function, (f - 1) * min(a, b) / 2,
    # which is exact on the boundary and avoids a sqrt per pixel.
    f = ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2
    return _soft((f - 1) * (0.5 * torch.minimum(torch.as_tensor(a), torch.as_tensor(b))), px)


def _segment(X, Y, x0, y0, x1, y1, half_w, px):
    dx, dy = x1 - x0, y1 - y0
    ll = dx * dx + dy * dy + 1e-9
    t = (((X - x0) * dx + (Y - y0) * dy) / ll).clamp_(0, 1)
    d = torch.sqrt((X - x0 - t * dx) ** 2 + (Y - y0 - t * dy) ** 2)
    return _soft(d - half_w, px)


def _col(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None]


def _rgba(color: torch.Tensor) -> torch.Tensor:
    """(B,3) colour -> (B,4,1,1) premultiplied opaque RGBA."""
    return torch.cat([color, torch.ones(color.shape[0], 1)], 1)[:, :, None, None]


class _Window:
    """A rectangle of the canonical frame (x right, y down, both in [-1, 1]),
    snapped to output pixels, with pixel-centre coordinates at ``ss`` times
    the output resolution and a transparent premultiplied RGBA layer.

    Every feature is drawn only inside a window that bounds it for all
    parameter values, so its cost scales with its area, not the image's.
    """

    def __init__(self, B: int, size: int, x0: float, x1: float, y0: float, y1: float, ss: int):
        def snap(lo, hi):
            return max(0, int(math.floor((lo + 1) * size / 2))), min(size, int(math.ceil((hi + 1) * size / 2)))
        (r0, r1), (c0, c1) = snap(y0, y1), snap(x0, x1)
        self.rows, self.cols, self.ss = slice(r0, r1), slice(c0, c1), ss
        self.px = 2.0 / (size * ss)
        self.X = (-1 + (torch.arange(c0 * ss, c1 * ss, dtype=torch.float32) + 0.5) * self.px).view(1, 1, -1)
        self.Y = (-1 + (torch.arange(r0 * ss, r1 * ss, dtype=torch.float32) + 0.5) * self.px).view(1, -1, 1)
        self.L = torch.zeros(B, 4, (r1 - r0) * ss, (c1 - c0) * ss)

    def paint(self, color: torch.Tensor, alpha: torch.Tensor) -> None:
        """Paint ``color`` (B,3) with coverage ``alpha`` (B,h,w) over the layer."""
        self.L.lerp_(_rgba(color).expand_as(self.L), alpha.unsqueeze(1))

    def pooled(self) -> torch.Tensor:
        """The layer area-downsampled to output resolution (still premultiplied)."""
        if self.ss == 1:
            return self.L
        B, C, H, W, k = *self.L.shape, self.ss
        # Adding strided views is ~10x faster on CPU than avg_pool2d or sum().
        rows = self.L.view(B, C, H // k, k * W)
        acc = rows[..., :W].clone()
        for i in range(1, k):
            acc += rows[..., i * W:(i + 1) * W]
        out = acc[..., 0::k].clone()
        for i in range(1, k):
            out += acc[..., i::k]
        return out.mul_(1 / (k * k))

    def onto(self, img: torch.Tensor) -> None:
        """Composite the (downsampled) layer over ``img`` (B,4,S,S), premultiplied."""
        lay = self.pooled()
        dst = img[:, :, self.rows, self.cols]
        dst.mul_(1 - lay[:, 3:]).add_(lay)


def _identity_layers(ip: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Per-identity layers, drawn once per identity and shared by its images.

    Large smooth shapes (hair, head, neck, ears) use analytic 1-pixel
    coverage at output resolution; glasses, which have thin rims, are drawn
    at ``_SS`` times the resolution and area-downsampled.
    """
    n = ip["fa"].shape[0]
    P = {k: (_col(v) if v.dim() == 1 else v) for k, v in ip.items()}
    fcy, hcy = 0.06, -0.02
    hx = P["fa"] + 0.06 + P["hvol"]
    hy = P["fb"] * 0.95 + P["hvol"]

    # Base: hair behind the head (ellipse plus an optional long part down the
    # sides), neck and ears (shaded skin), and the face, an ellipse whose
    # lower half tapers towards the chin.
    w = _Window(n, size, -1, 1, -1, 1, 1)
    X, Y, px = w.X, w.Y, w.px
    hair = _ellipse(X, Y, 0, hcy, hx, hy, px)
    long_part = _soft(X.abs() - hx, px) * _soft(hcy - Y, px) * _soft(Y - (hcy + P["hlen"]), px)
    w.paint(ip["hair"], torch.maximum(hair, long_part * (P["hlen"] > 0).float()).mul_(P["hair_on"]))
    neck = _soft(X.abs() - 0.55 * P["fa"], px) * _soft(0.35 - Y, px)
    ears = torch.maximum(_ellipse(X, Y, -P["fa"] * 0.98, fcy - 0.04, 0.07, 0.13, px),
                         _ellipse(X, Y, P["fa"] * 0.98, fcy - 0.04, 0.07, 0.13, px))
    w.paint(ip["skin"] * 0.9, torch.maximum(neck, ears))
    yn = (Y - fcy) / P["fb"]
    a_eff = P["fa"] * (1 - P["jaw"] * yn.clamp(0, 1) ** 2)
    w.paint(ip["skin"], _soft(((X / a_eff) ** 2 + yn ** 2 - 1) * (0.5 * P["fa"]), px))
    out = {"base": w.L}

    # Front hair: the hair ellipse above a curved, possibly slanted hairline.
    # It is composited after the brows, so a low fringe can hide raised brows.
    w = _Window(n, size, -1, 1, -1, -0.15, 1)
    X, Y, px = w.X, w.Y, w.px
    hl = P["hl0"] + P["hcurv"] * X * X + P["part"] * X
    w.paint(ip["hair"], _ellipse(X, Y, 0, hcy, hx, hy, px).mul_(_soft(Y - hl, px)).mul_(P["hair_on"]))
    out["front"], out["front_rows"] = w.L, w.rows

    # Glasses (some identities): tinted lenses, rims, bridge and temples.
    gidx = (ip["glasses"] > 0).nonzero().flatten()
    G = {k: P[k][gidx] for k in ("ae", "es", "ey", "fa", "tint")}
    w = _Window(gidx.numel(), size, -0.72, 0.72, -0.35, 0.15, _SS)
    X, Y, px = w.X, w.Y, w.px
    gx, gy = G["ae"] + 0.05, 0.10 + 0.2 * G["ae"]
    lens = torch.zeros(gidx.numel(), Y.shape[1], X.shape[2])
    rim = torch.zeros_like(lens)
    for s in (-1.0, 1.0):
        rr = torch.sqrt(((X - s * G["es"]) / gx) ** 2 + ((Y - G["ey"] - 0.01) / gy) ** 2)
        d = (rr - 1) * gy
        lens = torch.maximum(lens, _soft(d, px))
        rim = torch.maximum(rim, _soft(d.abs_() - 0.013, px))
        rim = torch.maximum(rim, _segment(X, Y, s * (G["es"] + gx), G["ey"] - 0.02, s * G["fa"], G["ey"] - 0.04, 0.01, px))
    rim = torch.maximum(rim, _segment(X, Y, -G["es"] + gx, G["ey"] - 0.02, G["es"] - gx, G["ey"] - 0.02, 0.012, px))
    w.paint(torch.full((gidx.numel(), 3), 0.05), lens * G["tint"])
    w.paint(ip["rim_col"][gidx], rim)
    slot = torch.full((n,), -1, dtype=torch.long)
    slot[gidx] = torch.arange(gidx.numel())
    out["glasses"], out["glasses_slot"], out["glasses_win"] = w.pooled(), slot, (w.rows, w.cols)
    return out


def _draw_features(img: torch.Tensor, ip: dict[str, torch.Tensor], au: torch.Tensor, size: int) -> None:
    """Draw the expression-dependent features at ``_SS``x over ``img`` (B,4,S,S)."""
    B = au.shape[0]
    P = {k: (_col(v) if v.dim() == 1 else v) for k, v in ip.items()}
    e = {k: _col(au[:, i]) for k, i in _A.items()}
    relu = torch.relu
    smile = relu(e["lip_corner"])

    # Cheeks: rosy identities, and smiles raise (and redden) the cheeks (AU6).
    blush_a = (P["rosy"] + 0.3 * smile).clamp(0, 0.6)
    cy = P["ey"] + 0.2 - 0.04 * smile
    blush_c = ip["skin"] * torch.tensor([0.95, 0.6, 0.6])
    for s in (-1.0, 1.0):
        lo, hi = (0.08, 0.6) if s > 0 else (-0.6, -0.08)
        w = _Window(B, size, lo, hi, -0.15, 0.32, _SS)
        w.paint(blush_c, _ellipse(w.X, w.Y, s * (P["es"] + 0.03), cy, 0.11, 0.07, 4 * w.px).mul_(blush_a))
        w.onto(img)

    # Nose: nostrils, a faint bridge line and, for AU9, wrinkles on the bridge.
    w = _Window(B, size, -0.12, 0.12, -0.15, 0.3, _SS)
    X, Y, px = w.X, w.Y, w.px
    nw = e["nose_wrinkle"].clamp(0, 1.2)
    ny = 0.20 + 0.5 * (P["my"] - 0.43) - 0.03 * nw
    nose = torch.maximum(_ellipse(X, Y, -0.045, ny, 0.025, 0.014, px),
                         _ellipse(X, Y, 0.045, ny, 0.025, 0.014, px)).mul_(0.8)
    nose = torch.maximum(nose, _segment(X, Y, 0.03, P["ey"] + 0.05, 0.05, ny - 0.05, 0.006, px).mul_(0.35))
    wr_a = nw.clamp(0, 1)
    for k in range(3):
        yk = P["ey"] + 0.08 + 0.035 * k
        nose = torch.maximum(nose, _segment(X, Y, -0.055, yk + 0.01, 0.055, yk - 0.01 * (k - 1), 0.010, px).mul_(wr_a))
    w.paint(ip["skin"] * 0.6, nose)
    w.onto(img)

    # Eyes (AU5 widens, AU7 narrows): white, iris, pupil and an outline with
    # a thicker upper lid. Then brows: AU1+2 lifts them, AU4 lowers them and
    # pulls the inner ends down and together, AU1 lifts the inner ends.
    ae = P["ae"]
    be = 0.52 * ae * (1 + 0.8 * e["eye_open"]).clamp(min=0.15)
    by = P["ey"] - P["bgap"] - 0.11 * e["brow_raise"] + 0.07 * e["brow_lower"]
    white_c, pupil_c, line_c = torch.full((B, 3), 0.96), torch.full((B, 3), 0.03), torch.full((B, 3), 0.12)
    ri, rp = 0.48 * ae, 0.2 * ae
    for s in (-1.0, 1.0):
        lo, hi = (0.05, 0.5) if s > 0 else (-0.5, -0.05)
        w = _Window(B, size, lo, hi, -0.36, 0.16, _SS)
        X, Y, px = w.X, w.Y, w.px
        dx, dy = X - s * P["es"], Y - P["ey"]
        d = ((dx / ae) ** 2 + (dy / be) ** 2 - 1) * (0.5 * be)
        white = _soft(d, px)
        dc2 = dx * dx + dy * dy
        w.paint(white_c, white)
        w.paint(ip["iris"], _soft((dc2 - ri * ri) / (2 * ri), px).mul_(white))
        w.paint(pupil_c, _soft((dc2 - rp * rp) / (2 * rp), px).mul_(white))
        w.paint(line_c, _soft(d.abs_() - (0.008 + 0.01 * (dy < 0).float()), px))
        w.onto(img)
        lo, hi = (0.05, 0.56) if s > 0 else (-0.56, -0.05)
        w = _Window(B, size, lo, hi, -0.72, 0.1, _SS)
        xi = s * (P["es"] - 0.42 * P["bl"] + 0.03 * relu(e["brow_lower"]))
        xo = s * (P["es"] + 0.58 * P["bl"])
        yi = by - 0.11 * e["inner_raise"] + 0.06 * e["brow_lower"]
        yo = by + 0.015 + 0.02 * e["inner_raise"]
        w.paint(ip["brow_col"], _segment(w.X, w.Y, xi, yi, xo, yo, P["bt"], w.px))
        w.onto(img)

    # Mouth: lip-corner curve (AU12/AU15, plus one-sided asym), opening
    # (AU25-27), stretch (AU20), upper-lip raise (AU10), lip press (AU24).
    w = _Window(B, size, -0.48, 0.48, 0.15, 0.92, _SS)
    X, Y, px = w.X, w.Y, w.px
    openm = e["mouth_open"].clamp(min=0)
    press = e["lip_press"].clamp(0, 1.2)
    mw = (P["mw"] * (1 + 0.45 * e["mouth_stretch"]) * (1 - 0.25 * openm) * (1 - 0.12 * press)).clamp(min=0.08)
    xs2 = (X / mw) ** 2
    inside = (1 - xs2).clamp_(min=0)
    cf = e["lip_corner"] + e["asym"] * torch.sign(X)
    yc = P["my"] - 0.17 * cf * xs2.clamp(max=1.5)
    h = (0.13 * openm) * inside.sqrt()
    yu = yc - h - (0.07 * e["upper_lip_raise"].clamp(min=0)) * inside
    yl = yc + h
    lt = (P["lt"] * (1 - 0.75 * press).clamp(min=0.15)) * (1 - 0.5 * xs2).clamp_(min=0.3)
    Xa = X.abs()
    ax = _soft(Xa - mw, px)
    pr = press.view(B, 1).clamp(0, 1)
    w.paint(ip["lip_col"] * (1 - 0.25 * pr) + 0.1 * pr,
            _soft((yu - lt) - Y, px).mul_(_soft(Y - (yl + 1.3 * lt), px)).mul_(ax))
    cav = _soft(yu - Y, px).mul_(_soft(Y - yl, px)).mul_(_soft(Xa - 0.96 * mw, px))
    w.paint(torch.tensor([0.28, 0.06, 0.08]).expand(B, 3), cav)
    w.paint(torch.tensor([0.95, 0.93, 0.86]).expand(B, 3), cav * _soft(Y - (yu + 0.035), px))
    w.paint(torch.tensor([0.30, 0.10, 0.10]).expand(B, 3), _soft((Y - 0.5 * (yu + yl)).abs_() - 0.006, px).mul_(ax))
    w.onto(img)


def _blur(img: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """Per-image blur: a blend (weight ``strength`` in [0, 1]) between the image
    and its 3x3 binomial blur (a gaussian of sigma ~0.7 px). Shifted adds are far
    cheaper on CPU than a per-image convolution."""
    p = F.pad(img, (1, 1, 1, 1), mode="replicate")
    b = p[..., :-2] + 2 * p[..., 1:-1] + p[..., 2:]
    b = (b[..., :-2, :] + 2 * b[..., 1:-1, :] + b[..., 2:, :]).mul_(1 / 16)
    return img.lerp_(b, strength.view(-1, 1, 1, 1))


def _render_chunk(layers, ident, ip, au, nz, size: int, noise_g: torch.Generator) -> torch.Tensor:
    """Compose, pose, light and degrade one chunk of images; returns uint8."""
    B = au.shape[0]
    img = layers["base"][ident]                            # gather = copy, (B,4,S,S)
    _draw_features(img, ip, au, size)
    front = layers["front"][ident]
    dst = img[:, :, layers["front_rows"]]
    dst.mul_(1 - front[:, 3:]).add_(front)
    slot = layers["glasses_slot"][ident]
    g = (slot >= 0).nonzero().flatten()
    if g.numel():
        rs, cs = layers["glasses_win"]
        lay = layers["glasses"][slot[g]]
        img[g, :, rs, cs] = img[g, :, rs, cs] * (1 - lay[:, 3:]) + lay

    # Pose: each output pixel samples the canonical face at the inverse of the
    # rotation/scale/shift (bilinear; the face layers are already antialiased).
    coords = -1 + (torch.arange(size, dtype=torch.float32) + 0.5) * (2.0 / size)
    X, Y = coords.view(1, 1, size), coords.view(1, size, 1)
    cos, sin, sc = _col(torch.cos(nz["rot"])), _col(torch.sin(nz["rot"])), _col(nz["scale"])
    xt, yt = X - _col(nz["tx"]), Y - _col(nz["ty"])
    grid = torch.stack([(cos * xt + sin * yt) / sc, (cos * yt - sin * xt) / sc], -1)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # Background (in image coordinates: two colours mixed by a low-frequency
    # pattern), then lighting: global gain times a linear ramp at a random angle.
    pat = (0.5 + 0.5 * torch.sin(_col(ip["bg_fx"]) * X + _col(ip["bg_fy"]) * Y + _col(ip["bg_ph"]))).unsqueeze(1)
    bg = torch.lerp(ip["bg1"][:, :, None, None], ip["bg2"][:, :, None, None], pat)
    out = img[:, :3].add_(bg.mul_(1 - img[:, 3:]))
    out.mul_(((1 + _col(nz["lx"]) * X + _col(nz["ly"]) * Y) * _col(nz["gain"])).unsqueeze(1))
    out = _blur(out, nz["blur"])
    out.add_(nz["noise"][:, None, None, None] * torch.randn(out.shape, generator=noise_g))
    return out.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


# ---------------------------------------------------------------------- API

def render_faces(
    n: int,
    classes: torch.Tensor | Sequence[int] | None = None,
    *,
    size: int = 48,
    seed: int = 0,
    identity_offset: int = 0,
    identities_count: int = 100,
    prior: Sequence[float] | None = None,
    balanced_identities: bool = False,
) -> SyntheticSplit:
    """Draw ``n`` synthetic faces of ``size`` x ``size`` pixels.

    ``classes`` gives the class of every image (length ``n``); when ``None``
    classes are drawn from ``prior`` (uniform if ``None``). Identities are
    ``identity_offset + [0, identities_count)``; with ``balanced_identities``
    they are assigned round-robin (after shuffling) so each identity appears
    about equally often, otherwise uniformly at random. ``labels`` equals
    ``true_labels``. Output is a deterministic function of the arguments.
    """
    if not 32 <= size <= 128:
        raise ValueError(f"size must be in [32, 128], got {size}")
    if n < 0 or identities_count < 1:
        raise ValueError("need n >= 0 and identities_count >= 1")
    g = _generator(seed, 1)
    if classes is None:
        pr = torch.full((NUM_CLASSES,), 1.0) if prior is None else torch.as_tensor(prior, dtype=torch.float64)
        if pr.numel() != NUM_CLASSES or (pr < 0).any() or pr.sum() <= 0:
            raise ValueError(f"prior must have {NUM_CLASSES} non-negative entries with a positive sum")
        classes = (torch.multinomial((pr / pr.sum()).float(), n, replacement=True, generator=g)
                   if n else torch.zeros(0, dtype=torch.long))
    classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    if classes.numel() != n:
        raise ValueError(f"classes has {classes.numel()} entries, expected {n}")
    if n and (classes.min() < 0 or classes.max() >= NUM_CLASSES):
        raise ValueError("class index out of range")
    if balanced_identities:
        ident = (torch.arange(n) % identities_count)[torch.randperm(n, generator=g)]
    else:
        ident = torch.randint(identities_count, (n,), generator=g)

    # The many small tensor ops below are slower with several intra-op threads
    # (synchronisation dominates, badly so on a busy machine), so render on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _render(n, classes, ident, size=size, seed=seed, identity_offset=identity_offset,
                       identities_count=identities_count)
    finally:
        torch.set_num_threads(threads)


def _render(n: int, classes: torch.Tensor, ident: torch.Tensor, *, size: int, seed: int,
            identity_offset: int, identities_count: int) -> SyntheticSplit:
    ids = _identity_params(identities_count, _generator(seed, 2, identity_offset))
    rest = ids.pop("rest")
    au = _expression_aus(classes, rest[ident], _generator(seed, 3))
    nz = _nuisance(n, _generator(seed, 4))
    noise_g = _generator(seed, 5)
    # Identity layers are drawn once per identity (in chunks to bound memory).
    parts = [_identity_layers({k: v[i:i + _CHUNK] for k, v in ids.items()}, size)
             for i in range(0, identities_count, _CHUNK)]
    layers = {"base": torch.cat([p["base"] for p in parts]), "front": torch.cat([p["front"] for p in parts]),
              "front_rows": parts[0]["front_rows"], "glasses": torch.cat([p["glasses"] for p in parts]),
              "glasses_win": parts[0]["glasses_win"]}
    slots, offset = [], 0
    for p in parts:
        sl = p["glasses_slot"]
        slots.append(torch.where(sl >= 0, sl + offset, sl))
        offset += p["glasses"].shape[0]
    layers["glasses_slot"] = torch.cat(slots)

    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for i in range(0, n, _CHUNK):
        sl = slice(i, min(n, i + _CHUNK))
        idc = ident[sl]
        images[sl] = _render_chunk(layers, idc, {k: v[idc] for k, v in ids.items()}, au[sl],
                                   {k: v[sl] for k, v in nz.items()}, size, noise_g)
    return SyntheticSplit(images=images, labels=classes.clone(), true_labels=classes.clone(),
                          identities=ident + identity_offset)


_SPLIT_CODES = {"labeled": 11, "unlabeled": 12, "test": 13, "val": 14}
_LABELED_IDENTITIES = 12
_TEST_IDENTITIES = 150
_VAL_IDENTITIES = 75


def make_demo_splits(
    *,
    seed: int = 0,
    size: int = 48,
    labeled_per_class: int = 25,
    unlabeled: int = 6000,
    test_per_class: int = 100,
    unlabeled_prior: Sequence[float] | None = None,
    val_per_class: int = 50,
) -> dict[str, SyntheticSplit]:
    """The embedded demo dataset: ``{"labeled", "unlabeled", "val", "test"}``.

    * labeled: ``labeled_per_class`` (at most 30) images per class from 12 identities;
    * unlabeled: ``unlabeled`` images from other identities (about 4 images per
      identity), classes drawn from ``unlabeled_prior`` (default
      :data:`DEFAULT_UNLABELED_PRIOR`), ``labels`` all -1;
    * val: ``val_per_class`` images per class from 75 further identities (checkpoint selection);
    * test: ``test_per_class`` images per class from 150 further identities (scored once, with
      the checkpoint chosen on val).

    Identity ids never overlap between splits. Deterministic in ``seed``.
    """
    if not 1 <= labeled_per_class <= _MAX_LABELED_PER_CLASS:
        raise ValueError(f"labeled_per_class must be in [1, {_MAX_LABELED_PER_CLASS}], got {labeled_per_class}")
    if unlabeled < 0 or test_per_class < 1 or val_per_class < 1:
        raise ValueError("unlabeled must be >= 0, test_per_class and val_per_class >= 1")
    prior = DEFAULT_UNLABELED_PRIOR if unlabeled_prior is None else tuple(unlabeled_prior)
    n_unl_ids = max(1, unlabeled // 4)
    offsets = {"labeled": 0, "unlabeled": _LABELED_IDENTITIES, "test": _LABELED_IDENTITIES + n_unl_ids}

    def sub(split: str) -> int:
        return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _SPLIT_CODES[split]]).generate_state(1)[0])

    per_class = lambda k: torch.arange(NUM_CLASSES).repeat_interleave(k)  # noqa: E731
    labeled = render_faces(NUM_CLASSES * labeled_per_class, per_class(labeled_per_class), size=size,
                           seed=sub("labeled"), identity_offset=offsets["labeled"],
                           identities_count=_LABELED_IDENTITIES, balanced_identities=True)
    unl = render_faces(unlabeled, None, size=size, seed=sub("unlabeled"), prior=prior,
                       identity_offset=offsets["unlabeled"], identities_count=n_unl_ids)
    unl.labels = torch.full_like(unl.labels, -1)
    test = render_faces(NUM_CLASSES * test_per_class, per_class(test_per_class), size=size,
                        seed=sub("test"), identity_offset=offsets["test"],
                        identities_count=_TEST_IDENTITIES, balanced_identities=True)
    # The val split comes after every other split's identities and draws from its own seed, so
    # adding it left the labeled, unlabeled and test faces exactly as they were.
    val = render_faces(NUM_CLASSES * val_per_class, per_class(val_per_class), size=size,
                       seed=sub("val"), identity_offset=offsets["test"] + _TEST_IDENTITIES,
                       identities_count=_VAL_IDENTITIES, balanced_identities=True)
    return {"labeled": labeled, "unlabeled": unl, "val": val, "test": test}


def save_grid(split: SyntheticSplit, path: str | Path, n_per_class: int = 8, *, scale: int = 2) -> Path:
    """Write a PNG grid: one row per class (first ``n_per_class`` images by
    ``true_labels``), class names on the left."""
    from PIL import Image, ImageDraw

    S = split.images.shape[-1] * scale
    label_w, pad = 80, 2
    W = label_w + n_per_class * (S + pad)
    H = NUM_CLASSES * (S + pad)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(ABAW_LABELS):
        y = c * (S + pad)
        draw.text((4, y + S // 2 - 6), name, fill=(0, 0, 0))
        idx = (split.true_labels == c).nonzero().flatten()[:n_per_class]
        for j, i in enumerate(idx.tolist()):
            arr = split.images[i].permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((S, S), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (S + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
