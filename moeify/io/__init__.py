"""Model files: load what a user names (`load_model`), save and rebuild converted models (`save`, `load`)."""

from moeify.io.loader import load_model
from moeify.io.recipe import load, save
from moeify.io.sources import LoadedModel

__all__ = ["LoadedModel", "load", "load_model", "save"]
