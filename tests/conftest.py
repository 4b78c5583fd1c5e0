import pytest
from click.testing import CliRunner


@pytest.fixture
def run(tmp_path, monkeypatch):
    """Invoke `moeify ARGS...` in-process in a fresh working directory; returns click's Result."""
    from moeify.cli import main

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke

