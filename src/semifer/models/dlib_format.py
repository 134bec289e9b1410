"""Reader for dlib's serialised DNN files (``dlib::serialize(net, out)``), e.g.
``dlib_face_recognition_resnet_model_v1.dat``. Pure Python + NumPy; dlib is not needed.

The format (dlib/serialize.h, dlib/dnn/core.h, layers.h, input.h, cuda/tensor.h):

- integers: one header byte (low nibble = number of little-endian magnitude bytes that
  follow, bit 7 = negative), then the bytes;
- floats (scalars): two integers, mantissa and exponent: value = mantissa * 2**exponent
  (exponents 32000/32001/32002 mean +inf/-inf/nan);
- strings: an integer length, then the bytes; bools: the character '0' or '1';
- tensors: version, num_samples, k, nr, nc, then the values (version 2: raw float32
  little endian; version 1: dlib floats); alias tensors: version, num_samples, k, nr, nc.

A network is written from the loss layer inwards: the loss layer's version and
details, then the version of every nested layer (2 = a computational layer, 1 = a tag
or skip layer, which write nothing else, 3 = the layer on top of the input) down to the
input layer, then the input layer's details, then each computational layer's details
from the input side outwards, each followed by three bools and three cached tensors
(gradient state, usually empty); the version-3 layer adds its sample expansion factor.
So :func:`read_dlib_net` returns the layers in forward order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_SPECIAL_EXPONENTS = {32000: math.inf, 32001: -math.inf, 32002: math.nan}


class DlibFormatError(ValueError):
    """The bytes do not follow dlib's serialisation format (or use a layer this reader lacks)."""


@dataclass
class DlibLayer:
    kind: str                       # dlib's layer version string, e.g. "con_4", "affine_", "fc_2"
    attrs: dict[str, Any] = field(default_factory=dict)
    params: np.ndarray | None = None  # the flat parameter tensor (float32), where the layer has one


@dataclass
class DlibNet:
    loss: DlibLayer
    input: DlibLayer
    layers: list[DlibLayer]         # computational layers, input side first
    wrappers: int                   # tag / skip layers seen (they carry no data)


class _Stream:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = memoryview(data), 0

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"unexpected end of file at byte {self.pos} (wanted {n} more bytes)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        head = self._take(1)[0]
        size = head & 0x0F
        if head & 0x70 or size > 8:
            raise DlibFormatError(f"byte {self.pos - 1}: {head:#04x} is not a dlib integer header")
        value = int.from_bytes(self._take(size), "little")
        return -value if head & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        if exponent in _SPECIAL_EXPONENTS:
            return _SPECIAL_EXPONENTS[exponent]
        return math.ldexp(mantissa, exponent)

    def str(self) -> str:
        n = self.int()
        if not 0 <= n < 1 << 16:
            raise DlibFormatError(f"byte {self.pos}: implausible string length {n}")
        return bytes(self._take(n)).decode("ascii", errors="replace")

    def bool(self) -> bool:
        c = bytes(self._take(1))
        if c not in (b"0", b"1"):
            raise DlibFormatError(f"byte {self.pos - 1}: {c!r} is not a dlib bool")
        return c == b"1"

    def tensor(self) -> np.ndarray:
        version = self.int()
        shape = tuple(self.int() for _ in range(4))  # num_samples, k, nr, nc
        n = int(np.prod(shape))
        if version == 2:
            return np.frombuffer(self._take(4 * n), dtype="<f4").astype(np.float32).reshape(shape)
        if version == 1:
            return np.array([self.float() for _ in range(n)], dtype=np.float32).reshape(shape)
        raise DlibFormatError(f"byte {self.pos}: unknown tensor version {version}")

    def alias(self) -> tuple[int, int, int, int]:
        version = self.int()
        if version != 1:
            raise DlibFormatError(f"byte {self.pos}: unknown alias_tensor version {version}")
        return tuple(self.int() for _ in range(4))  # type: ignore[return-value]

    def peek_int(self) -> int:
        pos = self.pos
        try:
            return self.int()
        finally:
            self.pos = pos

    def at_end(self) -> bool:
        return self.pos >= len(self.data)


def _read_layer(s: _Stream, kind: str) -> DlibLayer:
    """Details of one layer whose version string ``kind`` was just read."""
    if kind in ("con_4", "con_5"):
        params = s.tensor()
        a = {name: s.int() for name in ("num_filters", "nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")}
        a["filters"], a["biases"] = s.alias(), s.alias()
        for name in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
            a[name] = s.float()
        a["use_bias"] = s.bool() if kind == "con_5" else True
        return DlibLayer(kind, a, params.ravel())
    if kind in ("fc_2", "fc_3"):
        a = {"num_outputs": s.int(), "num_inputs": s.int()}
        params = s.tensor()
        a["weights"], a["biases"] = s.alias(), s.alias()
        a["bias_mode"] = s.int()       # 0 = FC_HAS_BIAS, 1 = FC_NO_BIAS
        for name in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
            a[name] = s.float()
        if kind == "fc_3":
            a["use_bias"] = s.bool()
        return DlibLayer(kind, a, params.ravel())
    if kind == "affine_":
        params = s.tensor()
        a = {"gamma": s.alias(), "beta": s.alias(), "mode": s.int()}  # mode 0 = per channel (conv), 1 = per unit (fc)
        return DlibLayer(kind, a, params.ravel())
    if kind in ("max_pool_2", "avg_pool_2"):
        a = {name: s.int() for name in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")}
        return DlibLayer(kind, a)
    if kind in ("relu_", "add_prev_", "mult_prev_", "sig_", "htan_", "softmax_"):
        return DlibLayer(kind)
    if kind == "prelu_":
        params = s.tensor()
        return DlibLayer(kind, {"initial": s.float()}, params.ravel())
    raise DlibFormatError(f"byte {s.pos}: layer {kind!r} is not supported by this reader")


def _read_input(s: _Stream) -> DlibLayer:
    kind = s.str()
    if kind in ("input_rgb_image", "input_rgb_image_sized"):
        a: dict[str, Any] = {"avg_red": s.float(), "avg_green": s.float(), "avg_blue": s.float()}
        if kind == "input_rgb_image_sized":
            a["nr"], a["nc"] = s.int(), s.int()
        return DlibLayer(kind, a)
    raise DlibFormatError(f"input layer {kind!r} is not supported by this reader")


def _read_loss(s: _Stream) -> DlibLayer:
    kind = s.str()
    if kind.startswith("loss_metric_"):
        a = {"margin": s.float(), "dist_thresh": s.float()}
        return DlibLayer(kind, a)
    raise DlibFormatError(f"loss layer {kind!r} is not supported by this reader")


def read_dlib_net(path: str | Path) -> DlibNet:
    """Parse a dlib DNN file into its layers (forward order) with their parameters."""
    path = Path(path)
    s = _Stream(path.read_bytes())
    try:
        if s.int() != 1:
            raise DlibFormatError("not a dlib network file: the loss-layer version is not 1")
        loss = _read_loss(s)
        versions = []
        # Nested layer versions (3/2 = computational layer, 1 = tag/skip) until the input
        # layer's name, whose length prefix is longer than any version number.
        while s.peek_int() in (1, 2, 3):
            versions.append(s.int())
        inp = _read_input(s)
        layers = []
        while not s.at_end():
            layer = _read_layer(s, s.str())
            for _ in range(3):            # this_layer_setup_called, gradient_input_is_stale, output disabled
                s.bool()
            for _ in range(3):            # x_grad, cached_output, params_grad (training state)
                s.tensor()
            if not layers and versions and versions[-1] == 3:
                s.int()                   # the layer next to the input (version 3) adds sample_expansion_factor
            layers.append(layer)
    except DlibFormatError as e:
        raise DlibFormatError(f"{path}: {e}") from None
    if len(versions) - versions.count(1) != len(layers):
        raise DlibFormatError(f"{path}: {len(versions) - versions.count(1)} layer headers but {len(layers)} layers read")
    return DlibNet(loss, inp, layers, versions.count(1))
