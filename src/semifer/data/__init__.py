from semifer.data import readers  # noqa: F401
