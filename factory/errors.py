"""The one base of every error ct-factory reports to a person.

A :class:`CtFactoryError` says where (file:line, key path, field, URL or option) and what would
be valid; every ``ctfactory`` command catches this one type and prints it as one line with
exit status 2, never a traceback. Subclasses keep ``ValueError`` or ``RuntimeError`` as a
second base where callers already catch those.
"""

from __future__ import annotations


class CtFactoryError(Exception):
    """Bad input or an unusable resource, named in the message."""


class UsageError(CtFactoryError):
    """Bad input on the command line (an option and what is valid)."""
