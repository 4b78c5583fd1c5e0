"""User-facing errors, all in one place.

`MoeifyError` is a mistake the user can fix (bad file, bad option, nothing to convert); its message is one
line saying what is wrong and what to do. The CLI prints it without a traceback and exits 1 (2 for usage
errors, which click reports). Anything else is a bug and keeps its traceback.

The subclasses say which part of moeify refused; each is also a `ValueError`, so code catching that keeps
working. They are re-exported where they used to live (`moeify.config.ConfigError`,
`moeify.upcycle.UpcycleError`, `moeify.parallel.errors.ParallelError`): the same classes, not copies.
"""


class MoeifyError(Exception):
    """A user mistake with a one-line, actionable message."""


class ConfigError(MoeifyError, ValueError):
    """A configuration value is invalid; the message says which and what to use instead."""


class UpcycleError(MoeifyError, ValueError):
    """The dense FFN, the MoE layer and the upcycling config do not fit together; the message says how."""


class ParallelError(MoeifyError, ValueError):
    """Expert parallelism cannot be set up as asked; the message says why and what to do."""
