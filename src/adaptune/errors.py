"""Errors adaptune raises on purpose.

Every error a user can cause derives from :class:`AdaptuneError`; its message is one line that
says what is wrong and how to fix it. The command line prints that line and exits non-zero.
"""


class AdaptuneError(Exception):
    """Base class: a problem the user can fix (bad input, wrong file, unsupported model)."""


class ConfigError(AdaptuneError, ValueError):
    """An adapter or training configuration is invalid."""


class NameConflict(ConfigError):
    """A name is taken (a served task, an adapter a fusion brought), or an adapter is still in use
    by another (a fusion that fuses it)."""


class ArchitectureError(AdaptuneError):
    """The model's family is not supported, or a placement path does not resolve on it."""


class AdapterFileError(AdaptuneError):
    """An adapter folder is missing, truncated, corrupted, or does not match the model."""


class DataError(AdaptuneError):
    """A dataset is missing, empty, malformed, or does not match the task."""


class TrainingError(AdaptuneError):
    """Training cannot go on (for example the loss became NaN or infinite)."""
