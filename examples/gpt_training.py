"""Training loop, held-out evaluation and FLOP counting for the upcycling experiment.

What the FLOP count counts (per trained token, forward + backward = 3 x forward):
- 6 x active matmul parameters: every nn.Linear weight (and bias) outside MoE layers, the tied LM head
  included; for each MoE layer its router plus k of its E experts (the experts a token actually runs).
  Embedding lookups, LayerNorms, activations, softmax and the optimizer are not counted.
- 12 x layers x context x d_model for attention scores and the weighted sum of values (QK^T and AV,
  2 FLOPs per multiply-add, full T x T as the CPU kernel computes it, times 3 for the backward).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import moeify
from moeify.plot import LoadHistory

Tensor = torch.Tensor


def active_params_per_token(model: nn.Module) -> int:
    """Matmul parameters one token uses: Linears outside MoE layers, plus router + k experts per MoE layer."""
    total = 0
    inside_moe: set[str] = set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_moe):
            continue
        if isinstance(m, moeify.MoELayer):
            inside_moe.add(name)
            cfg = m.config
            per_expert = sum(p[0].numel() for p in (m.w1, m.w2, m.b1, m.b2) if p is not None)
            total += sum(p.numel() for p in m.router.parameters())  # [E, D] router
            total += cfg.k * per_expert
            if m.shared is not None:
                total += sum(p.numel() for p in m.shared.parameters())
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
    return total


def flops_per_token(model: nn.Module, n_layer: int, context: int, d_model: int) -> int:
    """Training FLOPs per token (see the module docstring for what is counted)."""
    return 6 * active_params_per_token(model) + 12 * n_layer * context * d_model


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[Tensor, Tensor]], loss_fn) -> float:
    """Mean held-out loss over fixed batches, in eval mode (training mode restored after)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        total += loss_fn(model(x), y).item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


@dataclass
class Curve:
    """Held-out loss against how much extra training went in, one row per evaluation."""

    step: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)  # on the test split, when train() is given one
    train_loss: list[float] = field(default_factory=list)  # mean training loss since the last evaluation

    def as_dict(self) -> dict[str, list]:
        return {k: list(v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 25
    eval_at: tuple[int, ...] = ()  # further steps to evaluate at (e.g. where a FLOP budget is reached)
    record_load_every: int = 5


def make_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (and stacked expert tensors), none on biases and norms."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied weights once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))


def train(model: nn.Module, sampler, settings: TrainSettings, eval_set, loss_fn, tokens_flops: int,
          history: LoadHistory | None = None, log: Callable[[str], None] = print, name: str = "",
          test_set=None) -> Curve:
    """Train `settings.steps` steps with a fresh AdamW (linear warmup, then constant LR).

    The loss is the LM loss plus `moeify.aux_loss(model)` (zero for a dense model). Wall time counts the
    training steps only, not the evaluations. Returns the held-out curve (`eval_set`; and `test_set` in
    `test_loss` when given), starting with the loss before the first step.
    """
    opt = make_optimizer(model, settings)
    curve = Curve()
    seconds, tokens, running, seen = 0.0, 0, 0.0, 0

    def record(step: int) -> None:
        curve.step.append(step)
        curve.tokens.append(tokens)
        curve.flops.append(float(tokens) * tokens_flops)
        curve.seconds.append(seconds)
        curve.loss.append(evaluate(model, eval_set, loss_fn))
        if test_set is not None:
            curve.test_loss.append(evaluate(model, test_set, loss_fn))
        curve.train_loss.append(running / seen if seen else float("nan"))
        log(f"  {name:>10} step {step:5d}  tokens {tokens:>9,d}  held-out {curve.loss[-1]:.4f}  "
            f"train {curve.train_loss[-1]:.4f}  {seconds:7.1f}s")

    record(0)
    model.train()
    for step in range(1, settings.steps + 1):
        x, y = sampler.next()  # [B, T] each
        for group in opt.param_groups:
            group["lr"] = settings.lr * min(1.0, step / max(1, settings.warmup))
        start = time.perf_counter()
        lm = loss_fn(model(x), y)
        loss = lm + moeify.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        seconds += time.perf_counter() - start
        if not math.isfinite(lm.item()):
            raise FloatingPointError(f"{name}: training loss became {lm.item()} at step {step}")
        tokens += y.numel()
        running, seen = running + lm.item(), seen + 1
        if history is not None and step % settings.record_load_every == 0:
            history.record(step, model)
        if step % settings.eval_every == 0 or step == settings.steps or step in settings.eval_at:
            record(step)
            running, seen = 0.0, 0
    return curve


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Linear interpolation of y at x along a curve with increasing xs (NaN outside the curve)."""
    if not xs or x < xs[0] or x > xs[-1]:
        return float("nan")
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def interleaved_step_seconds(models: dict[str, nn.Module], batch: tuple[Tensor, Tensor], loss_fn,
                             rounds: int = 5) -> dict[str, float]:
    """Median seconds of one full training step (forward, backward, AdamW step) per model, timed in turns.

    On a shared machine the load changes from minute to minute, so runs timed one after another are not
    comparable; timing the models in alternation, on copies, over several rounds, is. Round 0 is warm-up.
    """
    copies = {name: copy.deepcopy(m).train() for name, m in models.items()}
    opts = {name: make_optimizer(m, TrainSettings(steps=1)) for name, m in copies.items()}
    times: dict[str, list[float]] = {name: [] for name in copies}
    x, y = batch
    for r in range(rounds + 1):
        for name, m in copies.items():
            start = time.perf_counter()
            loss = loss_fn(m(x), y) + moeify.aux_loss(m)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            if r > 0:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
