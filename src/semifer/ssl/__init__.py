"""Semi-supervised algorithms and threshold policies (importing registers them)."""
from semifer.ssl import algorithms, dtm, dtm_online, rounds, thresholds  # noqa: F401
from semifer.ssl.algorithms import Algorithm, build_algorithm

__all__ = ["Algorithm", "build_algorithm", "algorithms", "dtm", "dtm_online", "rounds", "thresholds"]
