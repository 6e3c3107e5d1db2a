"""The one exception family a user sees: each message names the file, image, field or request."""


class NearRayError(RuntimeError):
    """An error with a message meant for the user; the CLI prints it on one line and exits non-zero."""
