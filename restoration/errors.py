"""The one error type the command line turns into a one-line message.

A `UserError` is something the user can act on: a bad argument or config value, a missing or unreadable file, a
store that refuses the credentials, a model file that is not one. `restoration` prints its first line and exits 2.
Any other exception is a bug and keeps its traceback. It subclasses `ValueError`, so library callers that catch
`ValueError` for bad input keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user asked for or supplied, stated in one line that names the value."""
