"""The one base class of errors a user can cause and fix.

A job prints such an error as one ``error:`` line on stderr and exits 2, without a traceback:
its message names the thing (a file, a key, an entry, a URL) and what to do. Everything else
is a bug or an outage and keeps its traceback. Each module keeps its own subclass, so callers
can still tell a bad dataset from a bad store; the job entry points catch only this base.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a bad config, wrong credentials, a missing object: fixable by the user."""
