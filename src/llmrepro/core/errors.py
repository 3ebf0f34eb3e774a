"""The one exception type for bad user input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input (unknown experiment, invalid config, missing file, ...). Never shown with a traceback."""

    exit_code = 2
