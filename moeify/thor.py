"""THOR's training objective (Zuo et al. 2022, "Taming Sparsely Activated Transformer with Stochastic
Experts", ICLR 2022, arXiv 2110.04260, §3): two forwards of one batch, each routed at random, trained on the
task and on agreeing.

    loss = CE(p1, y) + CE(p2, y) + alpha * CR(p1, p2),   CR(p1, p2) = 1/2 (KL(p1 || p2) + KL(p2 || p1))

The weighting is the authors' released code's (microsoft/Stochastic-Mixture-of-Experts,
thor/translation_thor.py, `train_step`: `loss = loss1 + loss2 + consistency_loss * consistency_alpha`, with
`symmetric_KL_loss` = 1/2 (KL(p||q) + KL(q||p))): both task losses at full weight (not their mean), the KL
halved. The paper's §3 text itself was not retrievable here (only its introduction is stored), so the
released code is what this is checked against. There every term is a sum over the non-padding target tokens
divided by their count, so `task_loss` must be a per-token mean (e.g. `F.cross_entropy`'s default) for
alpha to mean what it does there; `mask` (the non-padding positions) makes CR average over the same tokens.

CR is `moeify.losses.consistency_loss`. The randomness is the model's own: layers with `router="random"`
draw fresh experts per forward in training mode (and dropout draws fresh masks), so the two passes differ;
each pass acts as the other's teacher. The released IWSLT'14 recipe (run.sh) uses `--consistency-alpha 5.0`;
alpha is the caller's choice here (default 1.0, the released code's default). Costs two forwards and one
backward through both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from moeify.last_forward import aux_loss
from moeify.losses import consistency_loss

Tensor = torch.Tensor


@dataclass
class ThorLoss:
    """The parts of one THOR step: `total` (backward this), the two task losses and the consistency term."""

    total: Tensor
    task: tuple[Tensor, Tensor]
    consistency: Tensor


def _logits(output) -> Tensor:
    """A model's output as logits: a tensor as is, or the `.logits` of a Hugging Face ModelOutput."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise TypeError(f"thor_loss needs the model to return logits (a tensor or an output with .logits), "
                        f"got {type(output).__name__}; pass logits_of= to extract them")
    return logits


def thor_loss(model: nn.Module, batch, task_loss: Callable[[Tensor], Tensor], alpha: float = 1.0, *,
              logits_of: Callable[[object], Tensor] = _logits, mask: Tensor | None = None) -> ThorLoss:
    """Run `model` twice on `batch` (a tensor, a tuple of positional inputs, or a mapping of keyword inputs)
    and combine as THOR does. `task_loss(logits) -> scalar` is the supervised loss of one pass (a per-token
    mean); `mask` [...] (bool, the logits' leading shape) picks the positions the consistency term averages
    over (the non-padding tokens). Each pass's MoE auxiliary losses (`moeify.aux_loss`) are added too. The
    model must be in training mode for the routes to be random; call `.backward()` on `.total`.
    """
    if not (isinstance(alpha, (int, float)) and alpha >= 0):
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")

    def forward() -> tuple[Tensor, Tensor]:
        if isinstance(batch, Mapping):
            out = model(**batch)
        elif isinstance(batch, tuple):
            out = model(*batch)
        else:
            out = model(batch)
        return logits_of(out), aux_loss(model)

    logits_1, aux_1 = forward()
    logits_2, aux_2 = forward()
    task = (task_loss(logits_1), task_loss(logits_2))
    consistency = consistency_loss(logits_1, logits_2, mask)
    total = task[0] + task[1] + alpha * consistency + aux_1 + aux_2
    return ThorLoss(total=total, task=task, consistency=consistency)
