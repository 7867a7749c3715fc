"""The one exception a user sees as a one-line message and exit code 2.

Raise `UserError` for anything the user can fix (bad flag value, unknown model, unreadable
file). The message must say what is wrong *and* how to fix it; the CLI prints it on one line,
without a traceback.
"""


class UserError(Exception):
    """Bad input: printed as `error: <message>` on one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
