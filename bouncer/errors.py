"""Exception types, one per seam. Each message is one line a person can act on."""


class InputError(Exception):
    """Submitted input cannot be used (file, line, value named); nothing was written."""


class NotFound(Exception):
    """A user batch id that does not exist."""
