"""Names that moved keep working from their old place for one release: the same object, with a
DeprecationWarning that names the new place (errors moved without a warning: they are re-exported)."""

from __future__ import annotations

import importlib

import pytest

import moeify
from moeify import errors

MOVED = [  # (old module, name, new module)
    ("moeify.layer", "aux_loss", "moeify.last_forward"),
    ("moeify.stats", "routing_stats", "moeify.last_forward"),
    ("moeify.io.sources", "load_model", "moeify.io.loader"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED)
def test_old_path_warns_and_gives_the_same_object(old, name, new):
    with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to {new}.{name}"):
        got = getattr(importlib.import_module(old), name)
    assert got is getattr(importlib.import_module(new), name)


def test_public_names_point_at_the_new_homes():
    from moeify.io import load_model
    from moeify.last_forward import aux_loss, routing_stats

    assert moeify.aux_loss is aux_loss and moeify.routing_stats is routing_stats
    assert load_model.__module__ == "moeify.io.loader"


def test_unknown_names_still_raise_attribute_error():
    import moeify.layer

    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        moeify.layer.nothing_here  # noqa: B018


def test_errors_live_in_moeify_errors_and_are_re_exported():
    from moeify.config import ConfigError
    from moeify.parallel.errors import ParallelError
    from moeify.upcycle import UpcycleError
    from moeify.upcycle.config import UpcycleError as UpcycleErrorFromConfig

    assert ConfigError is errors.ConfigError is moeify.ConfigError
    assert UpcycleError is UpcycleErrorFromConfig is errors.UpcycleError
    assert ParallelError is errors.ParallelError
    for cls in (ConfigError, UpcycleError, ParallelError):
        assert cls.__module__ == "moeify.errors"
        assert issubclass(cls, errors.MoeifyError) and issubclass(cls, ValueError)
