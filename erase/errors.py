"""User-facing errors.

Anything the user can cause (a bad flag, a missing file, a wrong-shape checkpoint) raises
:class:`EraseError`; the CLIs print its message on one line and exit with status 2 instead of
showing a traceback. Programming errors stay ordinary exceptions.
"""


class EraseError(Exception):
    """An error caused by input the user can fix; the message says how."""


class NonFiniteLossError(EraseError):
    """A loss became NaN or infinite; the message names the last good checkpoint."""
