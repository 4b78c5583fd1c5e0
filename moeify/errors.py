"""User-facing errors.

`MoeifyError` is a mistake the user can fix (bad file, bad option, nothing to convert); its message is one
line saying what is wrong and what to do. The CLI prints it without a traceback and exits 1 (2 for usage
errors, which click reports). Anything else is a bug and keeps its traceback.
"""


class MoeifyError(Exception):
    """A user mistake with a one-line, actionable message."""
