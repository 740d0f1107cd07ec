"""Errors the user can fix: bad settings, bad or missing input, a result that is not a number.

Every one is a :class:`UserError`. ``run.py`` turns a ``UserError`` raised by a stage into one
line ``error: <message>`` on stderr and exit code 2 (no traceback unless
``HYDRA_FULL_ERROR=1``); anything else is a bug and keeps its traceback. Each class also
derives from the built-in exception callers already catch (``ValueError``,
``FileNotFoundError``, ``ArithmeticError``), so code written against those keeps working.

Messages are one line and name where the problem is: ``file:line: field 'x': problem`` for
input files, ``<setting>=<value>: must be in [a, b]`` for settings.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave (settings, files, data), reported in one line."""


class SettingsError(UserError, ValueError):
    """A setting (a config value or a hyperparameter) outside its valid range or choices."""


class InputError(UserError, ValueError):
    """Input data the pipeline cannot use: bad format, a missing field, an impossible value."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named (or the pipeline needs) is not there."""


class NonFiniteResultError(UserError, ArithmeticError):
    """A prediction or metric is NaN or infinite (e.g. training diverged)."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (continuation lines joined with ``; ``)."""
    text = str(error) or type(error).__name__
    if isinstance(error, KeyError) and error.args:  # KeyError quotes its message
        text = str(error.args[0])
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())
