"""The one exception type the command line turns into a one-line message."""


class SdepureError(Exception):
    """A problem with the user's input, files or settings (not a bug in sdepure)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), or its type's name."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
