"""One exception type for mistakes a user can fix; CLIs print it as one line and exit 2."""


class UserError(Exception):
    """Bad input: the message names the input and the fix. Never shown with a traceback."""


class EngineError(UserError):
    """An engine directory that cannot be used as it is (corrupt, tampered, other target)."""
