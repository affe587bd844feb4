"""Exceptions whose message is meant for the user: the UI and CLI show them as they are, never a traceback."""


class PruneScopeError(Exception):
    """Base of every error a user can cause and fix (bad file, bad setting)."""


class ModelLoadError(PruneScopeError):
    """The model file cannot be loaded as asked; the message says what the file is and what to do."""


class UntrustedPickleError(ModelLoadError):
    """The file is a pickle that would run code when loaded, and the user has not said they trust it."""


class DataError(PruneScopeError):
    """The data set is unusable as a whole (wrong layout, too few classes, unsafe archive)."""


class SettingsError(PruneScopeError):
    """A setting is out of range or does not fit the model (threshold, cluster size, step)."""


class CancelledError(PruneScopeError):
    """The user cancelled a long job; completed work is kept."""


class UntrustedCodeError(UntrustedPickleError):
    """The model's architecture is a Python file, which runs code when built, and the user has not said they trust it.

    A subclass of the pickle refusal because it is the same decision behind the same switch: whoever
    handles one (the Load page, the CLI) handles the other.
    """
