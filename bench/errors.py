"""User-facing errors: one line, non-zero exit, never a traceback."""


class UserError(Exception):
    """Bad input from the user (unknown name, bad value, missing file).

    The CLI prints ``error: <message>`` on one line and exits with code 2.
    The message must name the bad key or file and say how to fix it.
    """

    exit_code = 2
