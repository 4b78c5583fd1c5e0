"""The version of moeify (its own module, so any module can read it without importing the package first)."""

__version__ = "0.1.0"
