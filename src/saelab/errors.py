"""The one exception type users see: a one-line message that says what to do."""


class SaelabError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits 2."""


class UnknownHookError(SaelabError, KeyError):
    """A hook name that the model does not have."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class MissingPackageError(SaelabError, ImportError):
    """An optional package is needed; the message names the install command."""
