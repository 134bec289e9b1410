"""Semi-supervised algorithms and threshold policies (importing registers them)."""
from semifer.ssl import algorithms, thresholds  # noqa: F401
from semifer.ssl.algorithms import Algorithm, build_algorithm

__all__ = ["Algorithm", "build_algorithm", "algorithms", "thresholds"]
