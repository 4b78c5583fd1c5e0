"""`load_model`: the model a user names, whatever it is (see moeify.io.sources for the cases).

It picks the loader: `module:callable`, a moeify output directory (moeify.io.recipe), a Hugging Face
directory, or a model file (moeify.io.sources). It sits above both, since a recipe may in turn load its
dense source through `sources.load_file`.
"""

from __future__ import annotations

from pathlib import Path

from moeify.errors import MoeifyError
from moeify.io import recipe
from moeify.io.sources import (
    RECIPE_NAME,
    LoadedModel,
    call_spec,
    is_callable_spec,
    known_source,
    load_file,
    load_hf_dir,
)


def load_model(spec: str, arch: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load what the user named; MoeifyError (one line: what is wrong, what to do) when it cannot."""
    path = Path(spec)
    if arch is not None and not is_callable_spec(arch):
        raise MoeifyError(f"--arch {arch!r} is not of the form module:callable (e.g. mypkg.models:build)")
    if not path.exists():
        if is_callable_spec(spec):
            if arch is not None:
                raise MoeifyError("--arch is for a weights file; with module:callable the callable builds "
                                  "the model itself")
            model = call_spec(spec)
            return LoadedModel(model, {"kind": "callable", "target": spec}, spec, None)
        raise MoeifyError(f"no such file or directory: {spec}")
    if path.is_dir():
        if (path / RECIPE_NAME).exists():
            model = recipe.load(path, trust_pickle=trust_pickle)
            return LoadedModel(model, known_source(model) or {"kind": "unknown"}, spec, path)
        if (path / "config.json").exists():
            return load_hf_dir(path)
        raise MoeifyError(f"{spec} is a directory without config.json (Hugging Face) or {RECIPE_NAME} "
                          "(moeify); point at a model directory or a weights file")
    return load_file(path, spec, arch, trust_pickle)
