"""The one exception type the command line turns into a one-line message."""


class SdepureError(Exception):
    """A problem with the user's input, files or settings (not a bug in sdepure)."""
