"""Typed errors for problems a user can fix. The CLI prints them in one line and exits with 2;
the server turns them into 4xx answers."""


class AttendoError(Exception):
    """Base class: the message alone tells the user what is wrong."""


class ModelNotFoundError(AttendoError):
    """A model name or path that points at nothing attendo can read."""


class CheckpointError(AttendoError):
    """A checkpoint file is truncated, corrupt, or disagrees with its own config."""


class UnsupportedModelError(AttendoError):
    """A well-formed checkpoint of an architecture attendo does not implement."""


class UnsafeCheckpointError(AttendoError):
    """A pickle-based checkpoint: loading it could run arbitrary code, so it is refused."""


class ContextLengthError(AttendoError):
    """The prompt plus the requested new tokens do not fit the model's context window."""


class InvalidSettingError(AttendoError, ValueError):
    """A generation setting outside its valid range."""


class AdapterError(AttendoError):
    """A LoRA adapter that cannot be made, read or applied to the model it is given."""


class DataError(AttendoError):
    """A data file (for training or evaluation) that is missing, empty or malformed; the message
    names the file and, for a line-based file, the line."""
