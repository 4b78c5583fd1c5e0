"""`--config FILE`: a ConvertConfig written by hand, as JSON, or YAML when the name ends in .yaml/.yml.

The file holds ConvertConfig's fields (what `ConvertConfig.to_json()` writes), e.g.

    experts: 8
    k: 2
    init: {init: noise, noise_std: 0.02}
    layer: {capacity_factor: 2.0, num_shared_experts: 1}
    exclude: ["*.0.mlp"]

`read_config_file` returns the mapping as written, so command-line flags can be laid over it before it is
validated as one ConvertConfig.
"""

from __future__ import annotations

import json
from pathlib import Path

from moeify.config import ConfigError
from moeify.errors import MoeifyError

YAML_SUFFIXES = (".yaml", ".yml")


def read_config_file(path: Path) -> dict:
    """The mapping of ConvertConfig fields in `path` (not yet validated: flags may still override it)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MoeifyError(f"cannot read the config file {path}: {e}") from e
    if path.suffix.lower() in YAML_SUFFIXES:
        data = _parse_yaml(text, path)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); write a JSON object of ConvertConfig fields, "
                              "or name the file .yaml for YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of ConvertConfig fields (e.g. {{\"experts\": 8}}), "
                          f"got {type(data).__name__}")
    return data


def _parse_yaml(text: str, path: Path):
    try:
        import yaml
    except ImportError:
        raise MoeifyError(f"{path} is YAML, which needs PyYAML: pip install pyyaml (or write the config as "
                          "JSON)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        one_line = " ".join(str(e).split())
        raise ConfigError(f"{path} is not valid YAML ({one_line})") from None
