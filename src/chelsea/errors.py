"""Errors that tell the user what to change. The CLI prints them without a traceback."""


class ChelseaError(ValueError):
    """Bad input: a setting out of range, an unsupported model, a prompt that does not fit."""


class UnsupportedModelError(ChelseaError):
    """The model's architecture or attention layout cannot take the clustered cache."""


class MissingDependencyError(ChelseaError):
    """An optional package (e.g. a built-in model's weights) is not installed."""
