"""The one error type of the data pipeline: a sample that cannot be turned into model inputs.

Raised by the processor (wrong `<image>` count, unreadable image, nothing to supervise, ...) and
by the dataset readers (malformed json line, missing `messages`); the dataset adds where the
sample came from, so the message names the file and line/index. `build_dataloader` either
re-raises it (default) or, with `skip_bad_samples`, logs it, counts it and moves on.
"""
from __future__ import annotations


class BadSampleError(ValueError):
    """A sample that cannot be processed. `where` names its origin (file, line/index)."""

    def __init__(self, message: str, where: str | None = None):
        self.reason = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)

    def __reduce__(self):  # keep `where` when crossing a process boundary (process workers)
        return BadSampleError, (self.reason, self.where)

    def located(self, where: str) -> "BadSampleError":
        """The same error, with its origin filled in (kept if already known)."""
        return self if self.where else BadSampleError(self.reason, where)
