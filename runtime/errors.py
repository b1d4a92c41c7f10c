"""The one base class of every error a user can act on (NNCF's errors.py): a bad file, flag,
bundle, data set or model. CLIs catch `LandmarkError` and print its one-line message; anything
else is a bug and keeps its traceback. Lives in runtime/ (the ground floor: it imports nothing
outside itself) so every stage can derive from it.

    from runtime.errors import ConfigError, LandmarkError
    raise ConfigError(f"--max-faces must be >= 1, got {n}")
"""
from __future__ import annotations


class LandmarkError(Exception):
    """Base of every user-facing error of the pipeline; its message says what to do."""


class ConfigError(LandmarkError, ValueError):
    """A value given by the user (flag, argument, checkpoint or label file) cannot be used."""


class UnknownNameError(LandmarkError, KeyError):
    """A name (scheme, engine, set, backend) that is not registered."""

    def __str__(self) -> str:          # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else ""
