"""Add the routers' auxiliary losses to the loss a model's forward returns, while training.

Hugging Face's Mixtral adds its load-balancing loss to `outputs.loss` (and reports it as
`outputs.aux_loss`) when asked for router logits; Trainer, TRL's trainers and accelerate loops then train
it because they only ever call `outputs.loss.backward()`. A converted model gets the same behaviour from a
forward hook on the model itself, installed by `moeify.convert` (`ConvertConfig.add_aux_loss`, on by
default):

    out = moe_model(input_ids, labels=labels)      # model.train()
    out.loss      # task loss + moeify.aux_loss(moe_model)
    out.aux_loss  # moeify.aux_loss(moe_model), with gradient

It acts only in training mode and only on outputs that are mappings (an HF `ModelOutput`, a dict): `loss`
grows by the aux loss when the forward returned one; `aux_loss` is set whenever there is an MoE layer that
recorded a loss. Tensor and tuple outputs are returned unchanged (add `moeify.aux_loss(model)` yourself).

The hook is a module-level function reading the module it is called on (never a closure over the model), so
`copy.deepcopy(model)` and pickling carry a hook that acts on the copy. `moeify.load` rebuilds it through
the recipe's `ConvertConfig`.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from torch import nn

AUX_LOSS_KEY = "aux_loss"  # Mixtral's output field name


def _add_aux_loss(module: nn.Module, args, output):
    """Forward hook: `output["loss"] += aux`, `output["aux_loss"] = aux` in training mode."""
    if not module.training or not isinstance(output, MutableMapping):
        return None
    from moeify.layer import MoELayer

    losses = [m.last_aux_loss for m in module.modules()
              if isinstance(m, MoELayer) and m.last_aux_loss is not None]
    if not losses:
        return None  # no router loss (coefficients 0, or no MoE layer ran): leave the output as it was
    aux = sum(losses[1:], losses[0])  # [] with gradient to the routers; = moeify.aux_loss(module)
    loss = output.get("loss")
    if loss is not None:
        output["loss"] = loss + aux.to(loss.dtype)
    output[AUX_LOSS_KEY] = aux
    return output


def has_aux_loss_hook(model: nn.Module) -> bool:
    """True when `model` adds its aux losses to its returned loss (see `install_aux_loss_hook`)."""
    return any(hook is _add_aux_loss for hook in model._forward_hooks.values())


def install_aux_loss_hook(model: nn.Module) -> nn.Module:
    """Make `model`'s forward add its routers' aux losses to its returned `loss` in training. Idempotent."""
    if not has_aux_loss_hook(model):
        model.register_forward_hook(_add_aux_loss)
    return model


def remove_aux_loss_hook(model: nn.Module) -> nn.Module:
    """Undo `install_aux_loss_hook` (the returned loss is the task loss alone again)."""
    for key in [k for k, hook in model._forward_hooks.items() if hook is _add_aux_loss]:
        del model._forward_hooks[key]
    return model
