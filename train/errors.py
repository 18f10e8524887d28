"""Errors shared by the training config modules (recipe.py and aitoolkit.py import it; neither imports the other's
error, so there is no import cycle)."""


class ConfigError(ValueError):
    """A bad training configuration; the message names the key and the allowed values."""
