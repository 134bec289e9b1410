"""dlib's face-recognition ResNet: the format reader, and output parity with dlib itself on real faces."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from semifer.models.dlib_format import DlibFormatError, _Stream
from semifer.models.dlib_resnet import DlibResNet, _add_padded


def test_integer_float_and_tensor_encodings():
    # dlib ints: header (byte count | 0x80 if negative), then little-endian magnitude bytes.
    s = _Stream(bytes([0x01, 0x00, 0x02, 0x80, 0x12, 0x81, 0x1C, 0x01, 0x96]))
    assert [s.int(), s.int(), s.int(), s.int()] == [0, 4736, -28, 150]
    # float = mantissa * 2**exponent: 0x1000000 * 2**-24 == 1.0; 0xa3d70a * 2**-28 ~ 0.04.
    s = _Stream(bytes([0x04, 0, 0, 0, 1, 0x81, 0x18, 0x03, 0x0A, 0xD7, 0xA3, 0x81, 0x1C]))
    assert s.float() == 1.0 and s.float() == pytest.approx(0.04, rel=1e-6)
    # tensor v2: version, n, k, nr, nc, raw float32 LE.
    raw = np.arange(6, dtype="<f4").tobytes()
    s = _Stream(bytes([0x01, 0x02, 0x01, 0x01, 0x01, 0x02, 0x01, 0x03, 0x01, 0x01]) + raw)
    assert s.tensor().shape == (1, 2, 3, 1) and s.at_end()
    with pytest.raises(DlibFormatError, match="not a dlib integer"):
        _Stream(bytes([0x31])).int()
    with pytest.raises(DlibFormatError, match="unexpected end"):
        _Stream(bytes([0x02, 0x01])).int()


def test_add_padded_zero_extends_like_dlib():
    a, b = torch.ones(1, 2, 3, 3), torch.full((1, 3, 4, 4), 2.0)
    out = _add_padded(a, b)
    assert out.shape == (1, 3, 4, 4) and out[0, 0, 0, 0] == 3 and out[0, 0, 3, 3] == 2 and out[0, 2, 0, 0] == 2


def test_geometry_dlib_and_same_padding():
    net = DlibResNet(width=4).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 150, 150)).shape == (1, 128)
        assert net(torch.rand(1, 3, 48, 48)).shape == (1, 128)   # 'auto' pads strided layers below 112 px
    with pytest.raises(RuntimeError), torch.no_grad():   # dlib's unpadded geometry runs out of pixels
        DlibResNet(width=4, padding="dlib").eval()(torch.rand(1, 3, 64, 64))


def _have(*mods: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in mods)


needs_dlib = pytest.mark.skipif(not _have("dlib", "face_recognition_models", "skimage"),
                                reason="needs dlib-bin, face_recognition_models, scikit-image (extra 'pretrained')")


@needs_dlib
def test_reader_on_the_real_model_file():
    from semifer.models.dlib_format import read_dlib_net
    from semifer.models.dlib_resnet import dlib_fr_model_path

    net = read_dlib_net(dlib_fr_model_path())
    kinds = [layer.kind for layer in net.layers]
    assert kinds.count("con_4") == 29 and kinds.count("affine_") == 29 and kinds.count("add_prev_") == 14
    assert kinds[0] == "con_4" and kinds[-1] == "fc_2" and net.input.attrs["nr"] == 150
    assert net.loss.kind == "loss_metric_2" and net.wrappers == 22   # tags + skips of 10 + 4 residual blocks


@needs_dlib
def test_outputs_match_dlib_on_real_faces():
    """Same 150x150 aligned chip into dlib and into the PyTorch port: max |diff| <= 1e-3, cosine >= 0.9999."""
    from pathlib import Path

    import dlib
    import skimage.data
    import skimage.transform

    from semifer.models import Classifier
    from semifer.models.dlib_resnet import dlib_fr_model_path
    from semifer.models.pretrained import load_pretrained

    model_path = dlib_fr_model_path()
    fr = dlib.face_recognition_model_v1(str(model_path))
    detector = dlib.get_frontal_face_detector()
    landmarks = dlib.shape_predictor(str(Path(model_path).parent / "shape_predictor_5_face_landmarks.dat"))
    clf = Classifier("dlib_resnet34", 8)
    report = load_pretrained(clf.backbone, "dlib-fr")
    assert report.loaded == 29 * 2 + 29 * 5 + 1 and not report.missing
    clf.eval()

    astronaut = skimage.data.astronaut()
    h, w = astronaut.shape[:2]
    rotated = skimage.transform.rotate(astronaut[: h // 2, w // 8: w // 2 + w // 8], 12, resize=True)
    images = [astronaut, np.ascontiguousarray(astronaut[:, ::-1]), (rotated * 255).astype(np.uint8)]
    worst_diff, worst_cos = 0.0, 1.0
    for img in images:
        faces = detector(img, 1)
        assert len(faces) >= 1
        chip = dlib.get_face_chip(img, landmarks(img, faces[0]), size=150, padding=0.25)
        ref = np.asarray(fr.compute_face_descriptor(chip), dtype=np.float64)
        x = torch.from_numpy(chip).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():   # through the classifier's own normalisation, as in training
            ours = clf.backbone((x - clf.mean) / clf.std)[0].double().numpy()
        worst_diff = max(worst_diff, float(np.abs(ours - ref).max()))
        worst_cos = min(worst_cos, float(ours @ ref / np.linalg.norm(ours) / np.linalg.norm(ref)))
    print(f"dlib parity over {len(images)} chips: max |diff| {worst_diff:.2e}, min cosine {worst_cos:.8f}")
    assert worst_diff <= 1e-3 and worst_cos >= 0.9999
