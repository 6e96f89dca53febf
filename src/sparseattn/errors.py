"""The one exception type for bad user input."""


class UsageError(ValueError):
    """Bad input from the user: an unknown name, a knob or argument outside its allowed values,
    a file that is missing or was made for something else.

    The command line prints it as one line (``error: ...``) and exits with status 2; any other
    exception is a bug and keeps its traceback. A ValueError, so ``except ValueError`` still
    catches it.
    """
