"""The one exception type for mistakes a user can fix (bad config, bad data, missing files).

The CLIs catch it, print its one-line message (what is wrong, where, how to fix) and exit with code 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An expected, user-fixable error; `str(err)` is the single line shown to the user."""
