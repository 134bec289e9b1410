"""Issue 6 pipeline knobs: fused optimizer state round-trips, optim.compile, pinned in-memory batches."""
import copy

import pytest
import torch
from torch import nn

import semifer
from semifer.config import OptimConfig
from semifer.data.imageset import ImageSet, InMemorySource
from semifer.engine.trainer import make_optimizer, set_fused
from tests.conftest import tiny_config


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("saved_fused, resumed_fused", [(True, False), (False, True)])
def test_optimizer_state_moves_between_fused_and_default(saved_fused, resumed_fused):
    """A CUDA (fused) checkpoint resumes on a CPU (default SGD) and back, with its momentum intact."""
    model = _model()
    opt = make_optimizer(OptimConfig(), model, fused=saved_fused)
    _steps(model, opt, 3)
    state = copy.deepcopy(opt.state_dict())  # as if read from a file: no buffers shared with opt

    model2 = _model()
    model2.load_state_dict(model.state_dict())
    opt2 = make_optimizer(OptimConfig(), model2, fused=resumed_fused)
    opt2.load_state_dict(state)
    # load_state_dict brings the saved run's implementation flags along ...
    assert [g["fused"] for g in opt2.param_groups] == [True if saved_fused else None] * 2
    set_fused(opt2, resumed_fused)
    # ... set_fused picks this device's implementation again, keeping the state.
    assert [g["fused"] for g in opt2.param_groups] == [True if resumed_fused else None] * 2
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[p2]["momentum_buffer"])
    _steps(model, opt, 2, seed=2)
    _steps(model2, opt2, 2, seed=2)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, p2, rtol=1e-5, atol=1e-6)


def test_optim_compile_compiles_student_and_teacher(tiny_data, tmp_path, monkeypatch):
    """optim.compile: true compiles the student and the EMA teacher in place (off by default)."""
    assert OptimConfig().compile is False
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    res = semifer.train(tiny_config(tiny_data, tmp_path / "c", steps=2, optim={"compile": True},
                                    run={"eval_every": 2, "checkpoint_every": 2}))
    assert res.completed
    assert len(compiled) == 2 and compiled[0] is not compiled[1]
    assert {type(m).__name__ for m in compiled} == {"Classifier"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_in_memory_batches_equal_unpinned():
    data = ImageSet(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40) % 8,
                    torch.arange(40) % 8)
    plain = InMemorySource(data, 16, seed=3).batch(5)
    pinned = InMemorySource(data, 16, seed=3, pin_memory=True).batch(5)
    for k in ("x", "y", "idx", "y_true"):
        assert pinned[k].is_pinned() and torch.equal(pinned[k], plain[k])
        on_dev = pinned[k].to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_dev.cpu(), plain[k])
