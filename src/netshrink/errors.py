"""Errors that are the user's to fix.

A ``UserError`` reaches the command line as one line on stderr and exit code 2, with no
traceback: its message must name the problem and the fix. Anything else is our bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a wrong path, a wrong format, an unknown name, a value out of range."""
