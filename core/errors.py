"""Exceptions whose message is meant for the user: the UI and CLI show them as they are, never a traceback."""


class PruneScopeError(Exception):
    """Base of every error a user can cause and fix (bad file, bad setting)."""


class ModelLoadError(PruneScopeError):
    """The model file cannot be loaded as asked; the message says what the file is and what to do."""


# The control that says "I trust this file", as each interface names it. Core messages write the
# placeholder TRUST_CONTROL where that control belongs, so one message serves the app and the CLI.
TRUST_CONTROL = "{trust_control}"
TRUST_CONTROLS = {"app": "tick 'I trust this file' on the Load page", "cli": "pass --trusted"}


class UntrustedPickleError(ModelLoadError):
    """The file is a pickle that would run code when loaded, and the user has not said they trust it.

    The message names the trust control of the interface that shows it: ``str(exc)`` is the app's
    wording (pages show exceptions as they are); :meth:`for_interface` gives another interface's.
    """

    controls = TRUST_CONTROLS

    def __init__(self, message: str):
        self.template = message
        super().__init__(self.for_interface("app"))

    def for_interface(self, interface: str) -> str:
        """The message with the trust control of ``interface`` ('app' or 'cli')."""
        return self.template.replace(TRUST_CONTROL, self.controls[interface])


class ExportError(PruneScopeError):
    """The model could not be exported or bundled; nothing partial was left behind."""


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


class UntrustedRunError(UntrustedPickleError):
    """A run folder's own copy of a pickle or of model code would run, and the user has not trusted that copy.

    Run folders are data: a copied or edited folder must not run code because its ``config.json`` says so.
    In the app, loading the same file with 'I trust this file' ticked records the trust (see ``core.runs``).
    """

    controls = {"app": "load that model file on the Load page with 'I trust this file' ticked, then open the run "
                       "again", "cli": "pass --trusted"}


# Where a user's own architecture (a Python file) is given, as each interface names it (issue 27: weights of a
# CIFAR ResNet uploaded against the default architecture got no pointer to it).
CODE_CONTROL = "{code_control}"
CODE_CONTROLS = {"app": "choose 'Custom architecture (Python file) + weights' under 'What the file holds' on the "
                        "Load page and upload that file with these weights",
                 "cli": "pass --model-code FILE.py --model-class NAME --trusted instead of --arch"}


class ArchitectureMismatchError(ModelLoadError):
    """The weights are not those of the chosen architecture. The message ends with where a model defined in the
    user's own Python file is given, in the words of the interface that shows it (as :class:`UntrustedPickleError`)."""

    controls = CODE_CONTROLS

    def __init__(self, message: str):
        self.template = message
        super().__init__(self.for_interface("app"))

    def for_interface(self, interface: str) -> str:
        return self.template.replace(CODE_CONTROL, self.controls[interface])


def user_message(exc: PruneScopeError, interface: str) -> str:
    """The one-line message of ``exc`` as ``interface`` ('app' or 'cli') shows it."""
    return exc.for_interface(interface) if hasattr(exc, "for_interface") else str(exc)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc`` as one readable line (type and first line of its text): torch's errors can carry whole tensor dumps."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:limit]}" if first else type(exc).__name__
