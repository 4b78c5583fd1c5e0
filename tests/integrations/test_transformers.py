"""`RoutingCallback` in a real `Trainer` run on a tiny converted LLaMA: routing values reach the logs (and
the reporters, when placed with `add_to`), the heatmap is written at each checkpoint."""

import sys

import pytest
import torch

import moeify

transformers = pytest.importorskip("transformers")
from moeify.integrations.transformers import RoutingCallback, routing_logs  # noqa: E402

pytestmark = pytest.mark.slow  # a Trainer run: a few seconds


class Batches(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=16):
        self.ids = torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Reporter(transformers.TrainerCallback):
    """Stands in for TensorBoard / W&B: records what it was given when it was called."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def _trainer(tmp_path, callbacks=()):
    from moeify.zoo import tiny_llama

    model = moeify.convert(tiny_llama(num_hidden_layers=2), experts=4, k=2).train()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, logging_steps=2,
                                          save_steps=2, per_device_train_batch_size=4, report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=Batches(), callbacks=list(callbacks))


LAYERS = ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_trainer_logs_routing_and_writes_heatmaps(tmp_path):
    pytest.importorskip("matplotlib")
    reporter = Reporter()
    trainer = _trainer(tmp_path, [reporter, RoutingCallback()])  # reporter first, like Trainer's own
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for entry in logged:
        for name in LAYERS:
            assert 0.0 < entry[f"moe/{name}/balance"] <= 1.0
            assert entry[f"moe/{name}/dropped"] == 0.0  # top-k with no capacity drops nothing
            assert entry[f"moe/{name}/aux_loss"] > 0
        total = sum(entry[f"moe/{name}/aux_loss"] for name in LAYERS)
        assert entry["moe/aux_loss"] == pytest.approx(total)
    # Placed after the reporter, the routing values reached the log history but not the reporter.
    assert reporter.seen and not any(k.startswith("moe/") for k in reporter.seen[0])
    for step in (2, 4):
        png = tmp_path / f"checkpoint-{step}" / "expert_load.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_add_to_places_it_before_the_reporters(tmp_path):
    reporter = Reporter()
    trainer = _trainer(tmp_path, [reporter])
    RoutingCallback.add_to(trainer, heatmap=False)
    trainer.train()
    assert all(f"moe/{LAYERS[0]}/balance" in seen for seen in reporter.seen if "loss" in seen)
    assert not list(tmp_path.glob("checkpoint-*/expert_load.png"))


def test_routing_logs_match_the_layers():
    from moeify.zoo import tiny_mlp

    model = moeify.convert(tiny_mlp(), experts=4, k=1, layer={"capacity_factor": 0.5})
    assert routing_logs(model) == {}
    model.train()(torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)))
    logs = routing_logs(model)
    stats = moeify.routing_stats(model)
    assert len(stats) == 3
    for name, layer_stats in stats.items():
        load = layer_stats.load
        balance = float(-(load * load.clamp(min=1e-12).log()).sum() / torch.log(torch.tensor(4.0)))
        assert logs[f"moe/{name}/balance"] == pytest.approx(balance, abs=1e-6)
        assert logs[f"moe/{name}/dropped"] == layer_stats.dropped_fraction > 0  # capacity 0.5 drops some
        aux = float(model.get_submodule(name).last_aux_loss.detach())
        assert logs[f"moe/{name}/aux_loss"] == pytest.approx(aux)


def test_heatmap_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, [RoutingCallback()])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(moeify.errors.MoeifyError, match="pip install"):
        trainer.train()
