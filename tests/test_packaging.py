"""The install layout: `passes/` is installed as `moeify.passes`, never as a top-level `passes`.

A user's own `passes/` package (common among torch.fx users) must neither shadow moeify's passes nor be
shadowed by them, with a regular (non-editable) install as with an editable one.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_folder():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "moeify").rglob("__init__.py"))
    folders += sorted("moeify." + ".".join(p.parent.relative_to(ROOT).parts)
                      for p in (ROOT / "passes").rglob("__init__.py"))
    assert sorted(listed) == sorted(folders)


_USER_CODE = """
import passes, moeify, moeify.passes
from moeify.passes.rules import RULES
assert passes.MINE == 1, passes.__file__
assert moeify.passes is not passes and not hasattr(moeify.passes, 'MINE'), moeify.passes.__file__
assert moeify.FFNMatch is moeify.passes.FFNMatch
print('ok', len(moeify.find_ffns(moeify.zoo.tiny_mlp())))
"""


def _user_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "passes").mkdir(parents=True)
    (project / "passes" / "__init__.py").write_text("MINE = 1\n")
    return project


@pytest.mark.slow
def test_regular_install_beside_a_user_passes_package(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=600)
    assert not (target / "passes").exists()
    assert (target / "moeify" / "passes" / "rules" / "__init__.py").is_file()
    code = "import moeify.zoo\n" + _USER_CODE
    done = subprocess.run([sys.executable, "-c", code], cwd=_user_project(tmp_path), capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(target), "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "3"]


@pytest.mark.slow
def test_installed_moeify_beside_a_user_passes_package(tmp_path):
    """The moeify this suite runs (editable in CI) imports from a folder holding its own `passes/`."""
    code = "import moeify.zoo\n" + _USER_CODE
    done = subprocess.run([sys.executable, "-c", code], cwd=_user_project(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "3"]
