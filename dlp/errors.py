"""The library's user-facing error: one line that says what is wrong and how to fix it."""


class DLPError(ValueError):
    """Bad input or an unsupported situation. ``str(err)`` is one line naming the fix.

    The CLI prints it without a traceback and exits with status 2.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
