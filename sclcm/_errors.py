"""The error every input check raises (its own module, so that the lowest layers can use it)."""


class InputError(ValueError):
    """Raised when an AnnData cannot be used as given; the message says how to fix it."""

    __module__ = "sclcm"  # tracebacks name it as users import it: sclcm.InputError
