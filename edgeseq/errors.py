"""The error every reader of user files raises: below every other module, so any of them can
raise it without importing the bundle code."""


class BundleError(Exception):
    """A bundle or checkpoint is malformed; the message names the file and the problem."""
