"""Exceptions that the job protocol turns into one-line messages and exit files."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: the message is one line that names the file, column or value and says what to do."""


class JobAborted(BaseException):
    """The user or the scheduler asked to stop (``RELION_JOB_ABORT_NOW``, SIGTERM, SIGINT, SIGHUP).

    A ``BaseException`` like ``KeyboardInterrupt``: raised from a signal handler anywhere in the code, it must
    not be swallowed by an ``except Exception`` on its way to the job protocol."""


class BadOutput(Exception):
    """An output failed its check before SUCCESS (non-finite, constant or empty): the job ends with FAILURE."""
