"""The engine: training loop, EMA teacher, checkpoints, run directories, logs and plots."""
from semifer.engine.trainer import RunResult, train

__all__ = ["RunResult", "train"]
