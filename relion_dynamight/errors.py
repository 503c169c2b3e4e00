"""Exceptions that the job protocol turns into one-line messages and exit files."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: the message is one line that names the file, column or value and says what to do."""


class JobAborted(Exception):
    """The user asked to stop (``RELION_JOB_ABORT_NOW`` or SIGTERM)."""
