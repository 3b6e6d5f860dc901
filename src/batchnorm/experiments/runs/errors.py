"""The errors of a run: each message says what is wrong and what to do."""

from __future__ import annotations

__all__ = ["CheckpointError", "RunConfigMismatchError", "RunError"]


class RunError(ValueError):
    """A run folder cannot be resumed as it is; the message says why and what to do."""


class RunConfigMismatchError(RunError):
    """A run folder already holds a run with different settings."""


class CheckpointError(RunError):
    """A run's checkpoint cannot be read."""
