from semifer.data import readers  # noqa: F401
from semifer.data import unlabeled  # noqa: F401  (registers streamed unlabeled sources)
