"""Shared fixtures and the suite's markers.

Markers (registered in pyproject.toml): `ort` runs ONNX Runtime, `dist` starts torch.distributed process
groups, `slow` takes more than a few seconds. Tests under tests/lowering/ and tests/runtime/ are marked
`ort`, tests under tests/parallel/ `dist`, by their folder; `slow` is set on each test that earns it.
The fast subset for a developer: `python -m pytest -m "not slow and not ort and not dist"`.
"""

from pathlib import Path

import os

import pytest
from click.testing import CliRunner
from hypothesis import settings

# CI (CI=true) draws the same property-test examples every run, so a red CI is reproducible; a developer's
# run explores new ones each time.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

_FOLDER_MARKS = {"lowering": "ort", "runtime": "ort", "parallel": "dist"}
_TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    for item in items:
        parts = Path(str(item.path)).resolve().relative_to(_TESTS).parts
        mark = _FOLDER_MARKS.get(parts[0]) if len(parts) > 1 else None
        if mark is not None:
            item.add_marker(getattr(pytest.mark, mark))


@pytest.fixture
def run(tmp_path, monkeypatch):
    """Invoke `moeify ARGS...` in-process in a fresh working directory; returns click's Result."""
    from moeify.cli import main

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke
