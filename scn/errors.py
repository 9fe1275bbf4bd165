"""Errors scn raises for things a user can fix; the CLI prints them as one paragraph."""


class ScnError(Exception):
    """Base class: a problem with the user's input, explained in the message."""


class ConfigError(ScnError):
    """A configuration value is wrong (unknown name, wrong type, out of range)."""


class DataError(ScnError):
    """A dataset is missing or malformed."""


class FormatError(ScnError):
    """A .scn or checkpoint file is corrupt, truncated, of another version, or not scn at all."""


class SurgeryError(ScnError):
    """A model has a structure channel surgery cannot handle safely."""


class NumericalError(ScnError):
    """Training produced NaN or Inf."""
