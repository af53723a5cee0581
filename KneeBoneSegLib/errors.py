"""Errors that reach a user.

Every failure a person can fix (a wrong path, an unusable image, a model that
does not fit) is raised as :class:`KneeBoneSegError` with a one-line message
that names the file and says what to do. The command line and the Slicer
module show that message alone; anything else is a bug and keeps its
traceback.
"""


class KneeBoneSegError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class InputError(KneeBoneSegError):
    """The input image, mask or path cannot be used."""


class ModelError(KneeBoneSegError):
    """The model file or its card is missing, corrupt or does not fit."""


class OutputError(KneeBoneSegError):
    """The outputs cannot be written where asked."""


class Cancelled(KneeBoneSegError):
    """The user stopped the run; nothing was written."""
