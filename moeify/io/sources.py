"""Load a model from what a user types: a file, a directory or `module:callable`.

Accepted (`moeify.io.load_model`):
  (a) a full-module `.pt` written by `torch.save(model)`: one made only of torch.nn classes loads safely
      (weights_only with torch.nn allow-listed); one that needs other code (the user's model class) runs
      that code when unpickled, so it is refused unless `trust_pickle=True`;
  (b) a Hugging Face model directory (config.json + weights), loaded offline with transformers, using the
      class named in `config.architectures` (else AutoModel);
  (c) a state_dict `.pt`/`.pth`/`.bin` (read with `torch.load(weights_only=True)`) or `.safetensors`,
      plus `arch="module:callable"` that builds the model;
  (d) `module:callable` alone (the callable returns the model);
  (e) a moeify output directory (moeify.json), rebuilt with `moeify.load`.
`moeify.io.loader.load_model` picks the case; this module holds the loaders of (a)-(d), and moeify.io.recipe
the one of (e).

Each loader also returns a JSON-able *source* record saying how to rebuild the (dense) model without its
weights; `moeify.save` writes it into the recipe so `moeify.load` can rebuild the structure.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import re
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moeify.deprecation import moved
from moeify.errors import MoeifyError

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
RECIPE_NAME = "moeify.json"

# Models loaded here (or by moeify.load) -> their source record, so `moeify.save(model, path)` can write
# the recipe without being told. Weak: the registry never keeps a model alive.
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class LoadedModel:
    model: nn.Module
    source: dict  # JSON-able: how to rebuild the dense structure (see module docstring)
    label: str  # what the user typed, for messages
    path: Path | None  # the input file or directory (None for module:callable)


def remember_source(model: nn.Module, source: dict) -> None:
    _SOURCES[model] = source


def known_source(model: nn.Module) -> dict | None:
    return _SOURCES.get(model)


def is_callable_spec(spec: str) -> bool:
    """`pkg.module:callable` (and not a Windows drive or an existing path)."""
    if os.path.exists(spec) or ":" not in spec:
        return False
    module, _, attr = spec.partition(":")
    return bool(module) and bool(attr) and all(part.isidentifier() for part in module.split(".")) \
        and all(part.isidentifier() for part in attr.split("."))


def call_spec(spec: str) -> nn.Module:
    """Import `module:callable`, call it with no arguments, return the nn.Module it builds."""
    model = call_builder(spec)
    if not isinstance(model, nn.Module):
        raise MoeifyError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def call_builder(spec: str):
    """Import `module:callable`, call it with no arguments, return what it returns (MoeifyError, one line,
    when the import or the call fails)."""
    if not is_callable_spec(spec):
        raise MoeifyError(f"{spec!r} is not of the form module:callable (e.g. mypkg.models:build)")
    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())  # as `python -m` does: the user's own modules in the cwd
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MoeifyError(f"cannot import module {module_name!r} ({e}); check the name and that it is on "
                          "PYTHONPATH") from e
    finally:
        sys.path.remove(os.getcwd())
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise MoeifyError(f"module {module_name!r} has no attribute {attr!r}; name a function or class "
                              "that builds the model")
        obj = getattr(obj, part)
    if not callable(obj):
        raise MoeifyError(f"{spec} is not callable; name a function or class that builds the model")
    try:
        return obj()
    except MoeifyError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise MoeifyError(f"{spec}() failed: {type(e).__name__}: {first}") from e


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- state dicts

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or a weights-only `.pt`; MoeifyError for anything else."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise MoeifyError(f"{path} is not a readable safetensors file ({e}); is it corrupt or "
                              "truncated?") from e
    obj = _torch_load_weights_only(path)
    sd = _as_state_dict(obj)
    if sd is None:
        raise MoeifyError(f"{path} holds a {type(obj).__name__}, not a model or a state_dict of tensors")
    return sd


def _torch_nn_classes() -> list[type]:
    """torch.nn's own module classes: unpickling them runs only torch's code, never code from the file."""
    import inspect

    return [c for _, c in inspect.getmembers(nn, inspect.isclass) if issubclass(c, nn.Module)]


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


def _torch_load_weights_only(path: Path):
    """torch.load(weights_only=True), also accepting modules built only from torch.nn classes.

    Raises _NeedsPickle (with the global the file asks for) for a module that needs other code.
    """
    try:
        with torch.serialization.safe_globals(_torch_nn_classes()):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        # A pickle asking for code (a class or function outside torch.nn) needs trust; anything else the
        # weights-only unpickler trips on (an unknown opcode) is a damaged file.
        found = _GLOBAL_RE.search(str(e))
        if found:
            raise _NeedsPickle(found.group(1)) from e
        if "unrecognized function" in str(e):
            raise _NeedsPickle("") from e
        raise _corrupt(path, e) from e
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise _corrupt(path, e) from e


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _corrupt(path: Path, e: Exception) -> MoeifyError:
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and "weights_only" not in line
             and "Weights only" not in line and "documentation" not in line]
    detail = lines[-1] if lines else type(e).__name__
    return MoeifyError(f"{path} is not a readable PyTorch file ({detail}); is it corrupt or truncated?")


class _NeedsPickle(Exception):
    pass


def _as_state_dict(obj) -> dict[str, torch.Tensor] | None:
    """A flat name -> tensor dict, also from the common {'state_dict': ...} / {'model': ...} wrappers."""
    if isinstance(obj, dict):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj:
                inner = _as_state_dict(obj[key])
                if inner is not None:
                    return inner
    return None


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], what: str,
                            allow_missing: set[str] | frozenset = frozenset()) -> None:
    """Copy `state` into `model`, refusing unknown, missing or mis-shaped tensors with a clear message."""
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state) - set(allow_missing))
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise MoeifyError(f"the weights in {what} do not fit the model: {', '.join(parts)}; check that the "
                          "architecture matches the weights")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise MoeifyError(f"the weights in {what} do not fit the model: {name} has shape "
                              f"{tuple(tensor.shape)} in the file but {tuple(expected[name].shape)} in the "
                              "model; check that the architecture matches the weights")
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- Hugging Face

def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise MoeifyError("this is a Hugging Face model and transformers is not installed; "
                          "pip install 'moeify[hf]'") from e
    return transformers


def hf_model_class(transformers, config):
    """The class named in config.architectures when transformers has it, else AutoModel."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def hf_config_and_class(path: Path):
    """(config, model class) of a Hugging Face model directory; refuses one that needs custom code."""
    transformers = _transformers()
    try:
        with open(path / "config.json") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise MoeifyError(f"{path / 'config.json'} is not valid JSON ({e}); is the model directory "
                          "complete?") from e
    if raw.get("auto_map"):
        raise MoeifyError(f"{path} needs custom code from the model repository (auto_map in config.json); "
                          "moeify does not run it: build the model yourself and pass --arch module:callable")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoeifyError(f"transformers could not read {path / 'config.json'}: {detail}") from e
    return config, hf_model_class(transformers, config)


def load_hf_dir(path: Path) -> LoadedModel:
    config, cls = hf_config_and_class(path)
    try:
        model = cls.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad directory
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoeifyError(f"transformers could not load {path}: {detail}") from e
    model.eval()
    return LoadedModel(model, hf_source(model), str(path), path)


def hf_source(model: nn.Module) -> dict:
    return {"kind": "hf", "architecture": type(model).__name__, "config": model.config.to_dict()}


def is_hf_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "to_dict") and hasattr(model, "from_pretrained")


def no_init_weights():
    """transformers' context that skips weight initialisation (weights are loaded next)."""
    _transformers()
    try:
        from transformers.initialization import no_init_weights as skip
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights as skip
    return skip()


def rebuild_hf(source: dict) -> nn.Module:
    """The HF model of a source record with its weights left uninitialised (they are loaded next)."""
    transformers = _transformers()
    cls = getattr(transformers, source["architecture"], None)
    if cls is None:
        raise MoeifyError(f"this transformers ({transformers.__version__}) has no class "
                          f"{source['architecture']}; upgrade transformers")
    config_dict = dict(source["config"])
    config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    with no_init_weights():
        model = cls(config)
    if hasattr(model, "tie_weights"):  # from_pretrained ties embeddings; a bare constructor may not
        model.tie_weights()
    return model.eval()


# --------------------------------------------------------------------------- model files

def load_file(path: Path, spec: str | None = None, arch: str | None = None,
              trust_pickle: bool = False) -> LoadedModel:
    """A model file (cases a and c of the module docstring); `spec` is what the user typed, for messages.
    The entry point over every case, directories included, is `moeify.io.load_model`."""
    spec = str(path) if spec is None else spec
    if path.suffix == ".safetensors":
        return _with_arch(path, read_state_dict(path), arch, spec)
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise MoeifyError(f"unknown model format {path.suffix or '(no suffix)'!r} for {spec}; expected a "
                          "Hugging Face directory, .pt/.pth/.bin, .safetensors or module:callable")
    try:
        obj = _torch_load_weights_only(path)
    except _NeedsPickle as e:
        if not trust_pickle:
            needs = f" (it calls {e.args[0]})" if e.args and e.args[0] else ""
            raise MoeifyError(f"{spec} is a pickled module that runs code when loaded{needs}; pass "
                              "--trust-pickle if you trust where it came from, or save a state_dict and use "
                              "--arch") from None
        return _load_pickle(path, spec)
    if isinstance(obj, nn.Module):  # a module made only of torch.nn classes: safe to load
        return LoadedModel(obj.eval(), _pickle_source(path), spec, path)
    sd = _as_state_dict(obj)
    if sd is None:
        raise MoeifyError(f"{spec} holds a {type(obj).__name__}, not a model or a state_dict of tensors")
    return _with_arch(path, sd, arch, spec)


def _with_arch(path: Path, state: dict, arch: str | None, spec: str) -> LoadedModel:
    if arch is None:
        raise MoeifyError(f"{spec} holds only weights (a state_dict); pass --arch module:callable naming "
                          "the function that builds the model")
    model = call_spec(arch)
    load_state_dict_checked(model, state, spec)
    return LoadedModel(model.eval(), {"kind": "callable", "target": arch, "weights": str(path.resolve())},
                       spec, path)


def _pickle_source(path: Path) -> dict:
    return {"kind": "pickle", "path": str(path.resolve()), "sha256": file_sha256(path)}


def _load_pickle(path: Path, spec: str) -> LoadedModel:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)  # reached only with trust_pickle
    except Exception as e:
        raise MoeifyError(f"could not unpickle {spec}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, nn.Module):
        sd = _as_state_dict(obj)
        kind = "a state_dict (pass --arch)" if sd is not None else f"a {type(obj).__name__}"
        raise MoeifyError(f"{spec} holds {kind}, not a torch.nn.Module")
    return LoadedModel(obj.eval(), _pickle_source(path), spec, path)


__getattr__ = moved(__name__, {"load_model": "moeify.io.loader:load_model"})
