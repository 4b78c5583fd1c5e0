"""Hugging Face `Trainer` integration: `RoutingCallback` logs routing and draws expert load.

    trainer = Trainer(model=moe_model, args=args, train_dataset=ds, callbacks=[RoutingCallback()])
    RoutingCallback.add_to(trainer)   # the same, but ahead of TensorBoard / W&B / ... (see below)

At each logging step it adds, per MoE layer (module path `name`):
  moe/<name>/balance   normalised entropy of the expert load, 1 = uniform, 0 = one expert takes all
  moe/<name>/dropped   share of routed assignments dropped for capacity
  moe/<name>/aux_loss  the layer's auxiliary router loss (load balance + z-loss, weighted)
and `moe/aux_loss`, their sum. The numbers are from the last forward before the log (one batch, not an
average over the logging interval). At each checkpoint it writes `expert_load.png` (`moeify.plot`, needs
matplotlib) into the checkpoint folder.

Trainer calls callbacks in order and puts its reporting callbacks (TensorBoard, W&B, ...) first, so a
callback passed in `callbacks=` adds its values after they have reported: the console and
`trainer.state.log_history` get them, the reporters do not. `RoutingCallback.add_to(trainer)` puts the
callback before the reporters, so they log the routing values too.

transformers is imported when this module is, never by `import moeify`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from moeify.errors import MoeifyError
from moeify.layer import MoELayer
from moeify.plot import expert_load_heatmap, summarize_load
from moeify.last_forward import routing_stats

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError:
    raise MoeifyError("RoutingCallback needs transformers: pip install 'moeify[hf]'") from None

PREFIX = "moe"
HEATMAP_NAME = "expert_load.png"


def routing_logs(model: nn.Module) -> dict[str, float]:
    """The values `RoutingCallback` logs for `model`'s last forward (empty before any forward)."""
    logs: dict[str, float] = {}
    total, any_loss = 0.0, False
    for name, stats in routing_stats(model).items():
        logs[f"{PREFIX}/{name}/balance"] = summarize_load(stats.tokens_per_expert).balance
        logs[f"{PREFIX}/{name}/dropped"] = stats.dropped_fraction
        layer = model.get_submodule(name)
        if isinstance(layer, MoELayer) and layer.last_aux_loss is not None:
            value = float(layer.last_aux_loss.detach())
            logs[f"{PREFIX}/{name}/aux_loss"] = value
            total, any_loss = total + value, True
    if any_loss:
        logs[f"{PREFIX}/aux_loss"] = total
    return logs


class RoutingCallback(TrainerCallback):
    """Logs each MoE layer's balance, dropped fraction and aux loss; draws the expert load at each save.

    Args:
        heatmap: write `expert_load.png` at each checkpoint (needs matplotlib: `pip install "moeify[plot]"`;
            without it the save raises a one-line MoeifyError). False: logs only.
    """

    def __init__(self, heatmap: bool = True):
        self.heatmap = heatmap

    @classmethod
    def add_to(cls, trainer, **kwargs) -> RoutingCallback:
        """A new callback placed first in `trainer`'s callbacks, ahead of its reporters; returns it."""
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None:
            return
        values = routing_logs(_unwrap(model))
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)  # Trainer appended a copy of `logs` before calling us

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self.heatmap or model is None or not state.is_world_process_zero:
            return
        stats = routing_stats(_unwrap(model))
        if not stats:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():  # a save without a checkpoint folder (e.g. a custom Trainer): next to them
            folder = Path(args.output_dir)
        title = f"Expert load, step {state.global_step}"
        fig = expert_load_heatmap(stats, folder / HEATMAP_NAME, title=title)
        _close(fig)


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / FSDP / accelerate wrappers (they keep it as `.module`)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _close(fig) -> None:
    import matplotlib.pyplot as plt  # present: expert_load_heatmap drew the figure

    plt.close(fig)
