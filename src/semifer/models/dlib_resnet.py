"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) in PyTorch.

The network of dlib's ``dnn_face_recognition_ex.cpp``: a 150x150 RGB chip, minus the
per-channel means (122.782, 117.001, 104.298), divided by 256; con 7x7/2 (32) - affine -
relu - max_pool 3x3/2; residual levels of 3x(32), 4x(64), 3x(128), 3x(256), 1x(256)
blocks (con3x3 - affine - relu - con3x3 - affine, + input, relu), the first block of
every level after the first halving the resolution (con 3x3/2 on the branch, avg_pool
2x2/2 on the shortcut); global average pool; fc_no_bias 128.

Two dlib details matter for exact outputs: its strided convolutions and pools are
unpadded, and ``add_prev`` adds tensors of different sizes by zero-extending the smaller
one at the bottom/right (and in extra channels); :func:`_add_padded` does the same.
dlib's ``affine`` layers (BatchNorm folded at the end of training) load into
``BatchNorm2d`` with running mean 0 and variance 1 - eps, so eval mode is the same affine
map and fine-tuning can still use batch statistics (``model.freeze_bn: true`` keeps dlib's).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semifer.registry import BACKBONES

DLIB_MEAN_RGB = (122.782, 117.001, 104.298)   # dlib input_rgb_image defaults, 0-255 scale
DLIB_SCALE = 256.0
LEVELS = [(1, 3, 1), (2, 4, 2), (4, 3, 2), (8, 3, 2), (8, 1, 2)]  # (width multiple, blocks, first stride)
MIN_DLIB_GEOMETRY = 112   # padding='auto' keeps dlib's unpadded geometry from this input size up
EPS = 1e-5


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b where shapes may differ: the smaller is zero-extended (dlib's add_prev)."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grow(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))
    return grow(a) + grow(b)


class DlibBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1 if stride == 1 else 0)
        self.bn1 = nn.BatchNorm2d(cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(cout, eps=EPS)

    def forward(self, x: torch.Tensor, same: bool) -> torch.Tensor:
        if self.stride == 1:
            y = self.conv1(x)
        else:
            y = F.conv2d(x, self.conv1.weight, self.conv1.bias, self.stride, 1 if same else 0)
        y = self.bn2(self.conv2(F.relu(self.bn1(y))))
        shortcut = x if self.stride == 1 else F.avg_pool2d(x, 2, 2)
        return F.relu(_add_padded(y, shortcut))


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet. ``output='embedding'``: the 128-D descriptor (dlib's output);
    ``'pooled'``: the 256-D pooled features before it. ``padding='dlib'`` is dlib's geometry
    (needs inputs of about 112 px or more), ``'same'`` pads the strided layers (any size from
    about 32 px, same weights), ``'auto'`` picks 'dlib' from 112 px up."""

    input_mean = tuple(m / 255.0 for m in DLIB_MEAN_RGB)   # on semifer's [0, 1] input
    input_std = (DLIB_SCALE / 255.0,) * 3

    def __init__(self, in_chans: int = 3, width: int = 32, embedding: int = 128, output: str = "embedding",
                 padding: str = "auto") -> None:
        super().__init__()
        if output not in ("embedding", "pooled"):
            raise ValueError(f"dlib_resnet34 output must be 'embedding' or 'pooled', got {output!r}")
        if padding not in ("auto", "dlib", "same"):
            raise ValueError(f"dlib_resnet34 padding must be 'auto', 'dlib' or 'same', got {padding!r}")
        self.output, self.padding = output, padding
        self.conv1 = nn.Conv2d(in_chans, width, 7, 2, 0)
        self.bn1 = nn.BatchNorm2d(width, eps=EPS)
        cin = width
        for i, (mult, n, stride) in enumerate(LEVELS):
            w = width * mult
            blocks = [DlibBlock(cin, w, stride)] + [DlibBlock(w, w, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.ModuleList(blocks))
            cin = w
        self.pooled_dim = cin
        self.fc = nn.Linear(cin, embedding, bias=False)
        self.out_dim = embedding if output == "embedding" else cin
        self.pretrained_ignore = ("fc.",) if output == "pooled" else ()
        self.stages = [["conv1", "bn1"]] + [[f"layer{i + 1}"] for i in range(len(LEVELS))] + [["fc"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        same = self.padding == "same" or (self.padding == "auto" and min(x.shape[-2:]) < MIN_DLIB_GEOMETRY)
        x = F.conv2d(x, self.conv1.weight, self.conv1.bias, 2, 3 if same else 0)
        x = F.max_pool2d(F.relu(self.bn1(x)), 3, 2, 1 if same else 0)
        for i in range(len(LEVELS)):
            for block in getattr(self, f"layer{i + 1}"):
                x = block(x, same)
        x = x.mean((2, 3))
        return self.fc(x) if self.output == "embedding" else x


@BACKBONES.register("dlib_resnet34")
def dlib_resnet34(in_chans: int = 3, width: int = 32, embedding: int = 128, output: str = "embedding",
                  padding: str = "auto") -> tuple[nn.Module, int]:
    """dlib's face-recognition ResNet (29 conv, 128-D); --pretrained dlib-fr loads dlib's weights."""
    net = DlibResNet(in_chans, width, embedding, output, padding)
    return net, net.out_dim


def dlib_fr_model_path() -> Path:
    """``dlib_face_recognition_resnet_model_v1.dat`` from the installed ``face_recognition_models``.

    Located without importing the package (its ``__init__`` needs ``pkg_resources``).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("--pretrained dlib-fr needs the face_recognition_models package "
                                "(pip install 'semifer[pretrained]') or a path to "
                                "dlib_face_recognition_resnet_model_v1.dat")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "dlib_face_recognition_resnet_model_v1.dat"
    if not path.is_file():
        raise FileNotFoundError(f"face_recognition_models is installed but {path} is missing")
    return path


def dlib_state_dict(path: str | Path, width: int = 32) -> dict[str, torch.Tensor]:
    """Read a dlib face-recognition network file into :class:`DlibResNet`'s state-dict layout.

    Every convolution's geometry (filters, kernel, stride, padding) is checked against the
    PyTorch module, so a different dlib network is refused rather than loaded wrongly.
    """
    from semifer.models.dlib_format import DlibFormatError, read_dlib_net

    net = read_dlib_net(path)
    if net.input.kind not in ("input_rgb_image_sized", "input_rgb_image"):
        raise DlibFormatError(f"{path}: input layer {net.input.kind} is not an RGB image input")
    means = (net.input.attrs["avg_red"], net.input.attrs["avg_green"], net.input.attrs["avg_blue"])
    if not np.allclose(means, DLIB_MEAN_RGB, atol=1e-3):
        raise DlibFormatError(f"{path}: input means {means} differ from dlib's defaults {DLIB_MEAN_RGB}")
    ref = DlibResNet(in_chans=3, width=width)
    convs = [(n, m) for n, m in ref.named_modules() if isinstance(m, nn.Conv2d)]
    norms = [n for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)]
    con = [layer for layer in net.layers if layer.kind.startswith("con_")]
    aff = [layer for layer in net.layers if layer.kind == "affine_"]
    fcs = [layer for layer in net.layers if layer.kind.startswith("fc_")]
    if (len(con), len(aff), len(fcs)) != (len(convs), len(norms), 1):
        raise DlibFormatError(f"{path}: {len(con)} con / {len(aff)} affine / {len(fcs)} fc layers; "
                              f"dlib_resnet34 has {len(convs)} / {len(norms)} / 1")
    out: dict[str, torch.Tensor] = {}
    for (name, m), layer in zip(convs, con):
        a = layer.attrs
        pad = 0 if m.stride[0] == 2 else 1
        want = (m.out_channels, m.kernel_size[0], m.kernel_size[1], m.stride[0], m.stride[1], pad, pad)
        got = (a["num_filters"], a["nr"], a["nc"], a["stride_y"], a["stride_x"], a["padding_y"], a["padding_x"])
        if want != got or a["filters"][1] != m.in_channels:
            raise DlibFormatError(f"{path}: convolution {name}: dlib has (filters, nr, nc, stride, padding) {got}, "
                                  f"expected {want}")
        n = int(np.prod(a["filters"]))
        out[f"{name}.weight"] = torch.from_numpy(layer.params[:n].reshape(a["filters"]).copy())
        bias = layer.params[n:n + a["num_filters"]] if a["use_bias"] else np.zeros(a["num_filters"], np.float32)
        out[f"{name}.bias"] = torch.from_numpy(bias.copy())
    for name, layer in zip(norms, aff):
        k = layer.attrs["gamma"][1]
        if layer.attrs["mode"] != 0 or layer.params.size != 2 * k:
            raise DlibFormatError(f"{path}: affine layer for {name} is not per-channel with {k} channels")
        out[f"{name}.weight"] = torch.from_numpy(layer.params[:k].copy())
        out[f"{name}.bias"] = torch.from_numpy(layer.params[k:].copy())
        out[f"{name}.running_mean"] = torch.zeros(k)
        out[f"{name}.running_var"] = torch.full((k,), 1.0 - EPS)   # sqrt(var + eps) == 1: a pure affine map
        out[f"{name}.num_batches_tracked"] = torch.tensor(0)
    fc = fcs[0].attrs
    if fc["bias_mode"] != 1 or (fc["num_inputs"], fc["num_outputs"]) != (ref.fc.in_features, ref.fc.out_features):
        raise DlibFormatError(f"{path}: fc layer {fc['num_inputs']}->{fc['num_outputs']} (bias mode "
                              f"{fc['bias_mode']}); expected {ref.fc.in_features}->{ref.fc.out_features} without bias")
    # dlib's fc computes x @ W with W of shape (num_inputs, num_outputs); torch's Linear is x @ W.T.
    w = fcs[0].params.reshape(fc["num_inputs"], fc["num_outputs"])
    out["fc.weight"] = torch.from_numpy(np.ascontiguousarray(w.T))
    return out
