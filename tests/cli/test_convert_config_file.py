"""`moeify convert --config FILE`: a ConvertConfig from JSON or YAML, flags laid over the file's values."""

import json
import sys

import moeify


def _layers(path):
    return {n: m for n, m in moeify.load(path).named_modules() if isinstance(m, moeify.MoELayer)}


def test_yaml_config_with_flags_overriding_it(run, tmp_path):
    (tmp_path / "moe.yaml").write_text(
        "experts: 4\nk: 1\nseed: 1\nrouter: hash\n"
        "init: {init: noise, noise_std: 0.02}\n"
        "layer: {num_shared_experts: 1, capacity_factor: 4.0}\n"
        "exclude: ['*.0.mlp']\n"
    )
    result = run("convert", "moeify.zoo:tiny_mlp", "--config", "moe.yaml", "--seed", "3", "--router", "topk",
                 "--capacity-factor", "1.5", "-o", "out")
    assert result.exit_code == 0, result.output
    config = moeify.ConvertConfig.from_dict(json.loads((tmp_path / "out" / "moeify.json").read_text())
                                            ["conversion"]["config"])
    assert (config.experts, config.k, config.seed, config.router) == (4, 1, 3, "topk")  # flags win
    assert (config.init.init, config.init.noise_std) == ("noise", 0.02)  # the file's
    assert config.init.seed == 3  # a named init is seeded by the config's seed: --seed's
    assert config.layer == {"num_shared_experts": 1, "capacity_factor": 1.5}  # one layer key overridden
    layers = _layers(tmp_path / "out")
    assert sorted(layers) == ["blocks.1.mlp", "blocks.2.mlp"]
    cfg = next(iter(layers.values())).config
    assert (cfg.num_experts, cfg.k, cfg.num_shared_experts, cfg.capacity_factor) == (4, 1, 1, 1.5)


def test_json_config_alone_and_bad_files(run, tmp_path):
    (tmp_path / "moe.json").write_text(moeify.ConvertConfig(experts=2, k=2, every=2).to_json())
    result = run("convert", "moeify.zoo:tiny_mlp", "--config", "moe.json", "-o", "out")
    assert result.exit_code == 0, result.output
    assert sorted(_layers(tmp_path / "out")) == ["blocks.1.mlp"]
    assert next(iter(_layers(tmp_path / "out").values())).config.k == 2
    (tmp_path / "typo.json").write_text('{"experts": 4, "expert": 2}')
    bad = run("convert", "moeify.zoo:tiny_mlp", "--config", "typo.json", "-o", "out2")
    assert bad.exit_code == 2 and "typo.json: unknown ConvertConfig field(s) expert; valid:" in bad.output
    (tmp_path / "list.yaml").write_text("- 4\n")
    bad = run("convert", "moeify.zoo:tiny_mlp", "--config", "list.yaml", "-o", "out2")
    assert bad.exit_code == 2 and "must hold a mapping of ConvertConfig fields" in bad.output
    (tmp_path / "noexperts.json").write_text('{"k": 1}')
    bad = run("convert", "moeify.zoo:tiny_mlp", "--config", "noexperts.json", "-o", "out2")
    assert bad.exit_code == 2 and "Missing option '--experts'" in bad.output
    assert not (tmp_path / "out2").exists()


def test_yaml_without_pyyaml_says_what_to_install(run, tmp_path, monkeypatch):
    (tmp_path / "moe.yml").write_text("experts: 4\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` raises ImportError
    result = run("convert", "moeify.zoo:tiny_mlp", "--config", "moe.yml", "-o", "out")
    assert result.exit_code == 1 and "needs PyYAML: pip install pyyaml" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
