"""Errors the user can fix: bad settings, bad or missing input, a result that is not a number.

Every one is a :class:`UserError`. ``run.py`` turns a ``UserError`` raised by a stage into one
line ``error: <message>`` on stderr and exit code 2 (no traceback unless
``HYDRA_FULL_ERROR=1``, see :func:`full_error_requested`); anything else is a bug and keeps
its traceback. Each class also derives from the built-in exception callers already catch (``ValueError``,
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


class TooFewTreesError(InputError):
    """A predictor asked to fit on fewer measured trees (configurations) than it needs."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named (or the pipeline needs) is not there."""


class NonFiniteResultError(UserError, ArithmeticError):
    """A prediction or metric is NaN or infinite (e.g. training diverged)."""


class DiskFullError(UserError, OSError):
    """A write failed for lack of space (``ENOSPC``, or a quota: ``EDQUOT``)."""

    @classmethod
    def from_os_error(cls, error: OSError) -> DiskFullError | None:
        """The user error for ``error`` when it is a full disk, else None."""
        import errno

        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            return None
        where = f" writing {error.filename}" if error.filename else ""
        return cls(f"no space left on the device{where}: free some space, or write elsewhere "
                   "(IRENE_OUTPUTS=<folder>, hydra.run.dir=<folder>)")


FULL_ERROR_ENV = "IRENE_FULL_ERROR"  # the user's HYDRA_FULL_ERROR, kept by run.py (see there)


def full_error_requested() -> bool:
    """Whether the user asked for tracebacks instead of one-line errors (``HYDRA_FULL_ERROR=1``).

    ``run.py`` always sets ``HYDRA_FULL_ERROR=1`` for Hydra itself, so that Hydra re-raises
    instead of printing its own report, and keeps the user's value in ``IRENE_FULL_ERROR``
    (inherited by sweep jobs and the tracking worker)."""
    import os

    return os.environ.get(FULL_ERROR_ENV, os.environ.get("HYDRA_FULL_ERROR")) == "1"


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (continuation lines joined with ``; ``)."""
    text = str(error) or type(error).__name__
    if isinstance(error, KeyError) and error.args:  # KeyError quotes its message
        text = str(error.args[0])
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())
