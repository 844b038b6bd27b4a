"""The one exception type that reaches the user as a single line."""


class UserError(Exception):
    """Bad input (config, data, checkpoint): printed as one line, exit code 2."""

    exit_code: int = 2
