"""semifer: semi-supervised facial-expression recognition with a dynamic threshold module.

Importing the package registers every algorithm, threshold policy, backbone and
dataset format.
"""
from semifer import data, faces, models, ssl  # noqa: F401  (registration side effects)
from semifer.config import TrainConfig, load_config
from semifer.data import formats  # noqa: F401
from semifer.engine import RunResult, train
from semifer.labels import ABAW_LABELS

__version__ = "0.1.0"
__all__ = ["ABAW_LABELS", "Predictor", "RunResult", "TrainConfig", "load_config", "train", "__version__"]


def __getattr__(name: str):
    # Inference is imported on first use so ``import semifer`` stays light.
    if name == "Predictor":
        from semifer.infer import Predictor

        return Predictor
    raise AttributeError(f"module 'semifer' has no attribute {name!r}")
