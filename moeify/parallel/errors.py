"""Errors of expert parallelism."""

from moeify.errors import MoeifyError


class ParallelError(MoeifyError, ValueError):
    """Expert parallelism cannot be set up as asked; the message says why and what to do."""
