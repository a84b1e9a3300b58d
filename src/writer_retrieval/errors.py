"""Errors meant for the user: printed as a clear message, without a traceback."""


class InputError(ValueError):
    """Bad input or configuration; the message names the file or key and the problem."""
