"""Errors of expert parallelism: `ParallelError`, defined in `moeify.errors` with moeify's other errors and
re-exported here (the same class)."""

from moeify.errors import ParallelError

__all__ = ["ParallelError"]
