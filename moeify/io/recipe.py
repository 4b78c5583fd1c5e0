"""`moeify.save` / `moeify.load`: a converted model as safetensors weights plus a recipe.

A saved model is a directory:
  moeify.json              the recipe (below)
  model.safetensors        the weights (or shards + model.safetensors.index.json)

The recipe says how to rebuild the structure without running any code from the directory: the source
(how to build the dense model: a Hugging Face config, a `module:callable`, or a pickled file the user must
trust again), the conversion's `ConvertConfig` (with its own version) and the converted module paths.
`load` rebuilds the dense model, converts it with `init="none"` (structure only), checks that the same
modules were converted, and loads the weights with a shape check on every tensor.

Recipe versions: 2 stores `"conversion": {"config": <ConvertConfig dict>, "converted": [...]}`; 1 (moeify
0.1.0, before ConvertConfig) stored convert's keyword arguments as `"options"`, the other MoEConfig fields
under `"config"`. Both load.

`save(model, "x.pt")` instead writes the whole module with `torch.save` (a pickle: loading it runs code).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from moeify.convert import convert
from moeify.convert_config import ConvertConfig
from moeify.errors import MoeifyError
from moeify.io import sources
from moeify.io.atomic import atomic_output
from moeify.io.companions import copy_files
from moeify.io.empty_init import empty_params
from moeify.io.lazy_load import assign_weights
from moeify.io.weights import DEFAULT_SHARD_BYTES, dedupe, read_into, write_safetensors
from moeify.layer import MoELayer
from moeify.report import conversion_report, count_params
from moeify.version import __version__

RECIPE_NAME = sources.RECIPE_NAME
RECIPE_FORMAT = "moeify.recipe"
RECIPE_VERSION = 2  # 2: the conversion as a ConvertConfig (1: keyword options)


def conversion_record(model: nn.Module) -> dict | None:
    """{"config": ..., "converted": [...]} of a converted model, None for a model with no MoE layer."""
    if not any(isinstance(m, MoELayer) for m in model.modules()):
        return None
    report = conversion_report(model)
    return {"config": _jsonable(report.config.to_dict(), "conversion options"),
            "converted": list(report.converted)}


def recorded_config(conversion: dict, recipe_version: int) -> ConvertConfig:
    """The ConvertConfig a recipe's "conversion" record holds (a version-1 record: its keyword options)."""
    if recipe_version >= 2:
        return ConvertConfig.from_dict(conversion["config"])
    options = dict(conversion["options"])
    options.pop("inplace", None)
    layer = options.pop("config", None) or {}  # version 1's name for ConvertConfig.layer
    try:
        return ConvertConfig(**options, layer=layer)
    except TypeError as e:
        raise MoeifyError(f"the recipe's conversion options do not fit this moeify ({e}); upgrade "
                          "moeify") from e


def _jsonable(value, what: str):
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise MoeifyError(f"the {what} cannot be written as JSON ({e}); a filter_fn or calibration tensor "
                          "cannot be saved in a recipe: use include/exclude globs") from e


def resolve_source(model: nn.Module, source: str | dict | None) -> dict:
    if isinstance(source, dict):
        return source
    if isinstance(source, str):
        if not sources.is_callable_spec(source):
            raise MoeifyError(f"source {source!r} is not of the form module:callable")
        return {"kind": "callable", "target": source}
    known = sources.known_source(model)
    if known is not None:
        return known
    if sources.is_hf_model(model):
        return sources.hf_source(model)
    return {"kind": "unknown", "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def build_recipe(model: nn.Module, source: dict, conversion: dict | None, aliases: dict[str, str],
                 files: list[str]) -> dict:
    return {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "moeify_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "source": source,
        "conversion": conversion,
        "weights": {"files": files, "tied": aliases,
                    "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})},
        "num_parameters": count_params(model),
    }


def save(model: nn.Module, path: str | Path, *, source: str | dict | None = None, force: bool = False,
         inputs: tuple = (), max_shard_bytes: int = DEFAULT_SHARD_BYTES,
         progress: Callable[[int, int], None] | None = None, extra_files: Iterable[Path] = ()) -> Path:
    """Write `model` to `path`: a directory with safetensors + moeify.json, or a pickled `.pt`.

    source: how to rebuild the dense model: "module:callable", a source dict, or None to use what moeify
        knows (models from moeify's loaders and Hugging Face models are known; others need
        `moeify.load(path, model=fresh_dense_model)`).
    extra_files: files copied into the directory under their own names (e.g. the source's tokenizer, see
        moeify.io.companions); ignored for a `.pt`.
    force: replace an existing `path`. The output is written to a temporary path and renamed, so a failure
        leaves nothing behind.
    """
    path = Path(path)
    if path.suffix in (".pt", ".pth"):
        with atomic_output(path, directory=False, force=force, inputs=inputs) as tmp:
            _guard_os(lambda: torch.save(model, str(tmp)), path)
        return path
    if path.suffix:
        if path.suffix == ".safetensors":
            raise MoeifyError(f"{path}: moeify writes a directory (safetensors weights + {RECIPE_NAME}); "
                              "name a directory, or end the name in .pt for a single pickled file")
    src = resolve_source(model, source)
    record = conversion_record(model)  # fails early (before writing) when the options are not JSON-able
    state, aliases = dedupe(model.state_dict())
    with atomic_output(path, directory=True, force=force, inputs=inputs) as tmp:
        files = _guard_os(lambda: write_safetensors(state, tmp, {"moeify_version": __version__},
                                                    max_shard_bytes, progress), path)
        recipe = build_recipe(model, src, record, aliases, files)
        (tmp / RECIPE_NAME).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
        _guard_os(lambda: copy_files(extra_files, tmp, skip=os.listdir(tmp)), path)
    return path


def _guard_os(fn, path: Path):
    try:
        return fn()
    except OSError as e:
        raise MoeifyError(f"writing {path} failed: {e.strerror or e}; check the disk space and permissions")\
            from e


def read_recipe(path: Path) -> dict:
    file = path / RECIPE_NAME
    try:
        recipe = json.loads(file.read_text())
    except FileNotFoundError:
        raise MoeifyError(f"{path} has no {RECIPE_NAME}; is it a directory written by moeify?") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoeifyError(f"{file} is not valid JSON ({e}); the output is damaged: convert again") from e
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise MoeifyError(f"{file} is not a moeify recipe (no \"format\": \"{RECIPE_FORMAT}\")")
    if not isinstance(recipe.get("version"), int) or recipe["version"] > RECIPE_VERSION:
        raise MoeifyError(f"{file} has recipe version {recipe.get('version')!r}, newer than this moeify "
                          f"reads ({RECIPE_VERSION}); upgrade moeify")
    return recipe


def rebuild_source(source: dict, trust_pickle: bool = False) -> nn.Module:
    """The dense model a source record describes (weights are overwritten by the caller)."""
    kind = source.get("kind")
    if kind == "hf":
        return sources.rebuild_hf(source)
    if kind == "callable":
        return sources.call_spec(source["target"]).eval()
    if kind == "pickle":
        file = Path(source["path"])
        if not file.exists():
            raise MoeifyError(f"the source {file} of this model is gone and the recipe needs it to rebuild "
                              "the structure; pass model= (a fresh dense model) or convert again with "
                              "-o x.pt")
        return sources.load_file(file, trust_pickle=trust_pickle).model  # refuses untrusted code
    raise MoeifyError("this model was saved without a known source (not a Hugging Face model, nor loaded by "
                      "moeify); pass model= a freshly built dense model of the same architecture")


def load(path: str | Path, model: nn.Module | None = None, *, trust_pickle: bool = False,
         dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Module:
    """Rebuild a model written by `moeify.save`: structure from the recipe, weights with shape checks.

    model: a freshly built *dense* model to convert instead of rebuilding it from the recipe's source
        (needed when the source is unknown). A `.pt` path is unpickled (needs trust_pickle=True).
    dtype, device: the floating dtype and the device of the loaded model (default: as saved, CPU).

    A model rebuilt from a Hugging Face or module:callable source is built with meta parameters and each
    weight is assigned as it is read from the files (no second copy; see lazy_load.py).
    """
    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth"):
        return _placed(sources.load_file(path, trust_pickle=trust_pickle).model, dtype, device)
    if not path.is_dir():
        raise MoeifyError(f"no moeify output at {path}; expected a directory with {RECIPE_NAME}")
    recipe = read_recipe(path)
    source = recipe.get("source") or {}
    lazy = model is None and source.get("kind") in ("hf", "callable")
    with empty_params() if lazy else nullcontext():
        dense = model if model is not None else rebuild_source(source, trust_pickle)
        conversion = recipe.get("conversion")
        if conversion:
            config = recorded_config(conversion, recipe["version"]).replace(init="none")  # structure only
            converted = convert(dense, config, inplace=True)
        else:
            converted = dense
    if conversion:
        got = list(conversion_report(converted).converted)
        if got != list(conversion["converted"]):
            raise MoeifyError(f"rebuilding {path} converted {len(got)} module(s) where the recipe lists "
                              f"{len(conversion['converted'])}; the source model has changed since it was "
                              "saved")
    tied = recipe.get("weights", {}).get("tied")
    if lazy:
        saved = recipe.get("weights", {}).get("dtypes") or []
        if dtype is None and source.get("kind") == "hf" and len(saved) == 1:
            dtype = getattr(torch, saved[0])  # as transformers loads a checkpoint: in the dtype saved
        assign_weights(converted, path, tied, dtype=dtype, device=device)
    else:
        read_into(converted, path, aliases=tied)
        converted = _placed(converted, dtype, device)
    converted.eval()
    sources.remember_source(converted, source)
    return converted


def _placed(model: nn.Module, dtype: torch.dtype | None, device) -> nn.Module:
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device) if device is not None else model
