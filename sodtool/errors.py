"""The one exception type that means "the user's input is wrong".

Every stage raises `InputError` for bad input (missing files, malformed JSON, mismatched
artefacts...). The CLI turns it into one line on stderr and exit code 2; anything else is a
bug and keeps its traceback.
"""


class InputError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN / inf loss. The CLI prints one line and exits with code 3
    (2 is reserved for bad input); the last good checkpoint is left as it was."""

    exit_code = 3
