"""The error of a parallel size that does not fit (its own module, so that every parallel module can
raise it without importing the others)."""


class ParallelConfigError(ValueError):
    """A parallel size that does not fit the world size, another size, or the model."""
