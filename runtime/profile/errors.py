"""The profiler's one error type."""
from __future__ import annotations


class ProfileError(ValueError):
    """The bundle cannot be profiled as asked (wrong backend, a failed measurement, ...).

    ``detail`` holds the failed child's last stderr lines, when there is one."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail
