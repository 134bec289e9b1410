"""Skip optimizer steps whose loss or gradients are not finite; stop after too many in a row.

One bad batch (an overflow, a corrupt image that decoded to garbage) must not poison a
ten-hour run, and a run that has diverged must stop with its last good checkpoint intact
instead of writing NaN weights over it.
"""
from __future__ import annotations

import torch

from semifer import dist


class NonFiniteTrainingError(RuntimeError):
    """Raised after ``limit`` consecutive steps with a non-finite loss or gradient."""


class NonFiniteGuard:
    """Decides, per step, whether the optimizer may step; counts skips (saved with the run)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"optim.max_nonfinite_steps must be >= 1, got {limit}")
        self.limit = limit
        self.total = 0
        self.consecutive = 0

    def step_ok(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> bool:
        """True when loss and gradient norm are finite on every rank (one host sync per step)."""
        finite = (torch.isfinite(loss.detach().float()) & torch.isfinite(grad_norm.float())).float()
        # Ranks must agree, or their weights would drift apart.
        ok = bool(dist.all_reduce_mean(finite.reshape(1)).item() == 1.0)
        if ok:
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise NonFiniteTrainingError(
                f"{self.consecutive} consecutive steps (up to step {step}) had a non-finite loss or gradient; "
                f"stopping. The last checkpoint was written before them and is intact; lower optim.lr, set "
                f"optim.grad_clip, or check the data (optim.max_nonfinite_steps = {self.limit})")
        return False

    def state_dict(self) -> dict:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.total = int(state.get("total", 0))
        self.consecutive = int(state.get("consecutive", 0))


class BufferSnapshot:
    """Copies of the buffers (BatchNorm statistics and counters) of some modules, taken before a step.

    A forward pass updates BatchNorm running statistics before anyone knows the loss is
    NaN; restoring them makes a skipped step leave no trace. The copies are small (a few
    hundred KB even for an IR-100) and made with one foreach call.
    """

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.buffers = [b for m in modules for b in m.buffers()]
        self.saved: list[torch.Tensor] = []

    def take(self) -> None:
        self.saved = [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def restore(self) -> None:
        if self.saved:
            torch._foreach_copy_(self.buffers, self.saved)


def all_finite(module: torch.nn.Module) -> bool:
    """True when every parameter and buffer of ``module`` is finite (checked before a checkpoint write)."""
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)
