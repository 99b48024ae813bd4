"""Errors shared by the experiment layer and the config adapter of the model library."""


class ConfigError(ValueError):
    """A configuration problem, reported as one line that names the key and the fix."""
