"""Errors that binaries report to the user as one clear line (no traceback)."""


class ConfigError(ValueError):
    """A flag or config value is invalid; the message names the flag and what is expected."""


class CheckpointError(RuntimeError):
    """No checkpoint of a run folder can be restored; the message names the folder, the
    checkpoints tried and what to do."""
