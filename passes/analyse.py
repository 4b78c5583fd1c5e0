"""Analyse: run the FFN rules over every captured graph and keep one record per FFN.

The same FFN shows up in several graphs (LlamaMLP's own, and its decoder layer's if that traced too);
it is keyed by where its weights live, and the smallest site that can be rewritten wins. Each node of a
kept FFN gets `node.meta["moeify.analyse"] = {"ffn": name, "role": ...}`.

Nothing here changes the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from torch import nn

from moeify.passes import activation, plan
from moeify.passes.atoms import is_activation_module, is_linear_module
from moeify.passes.capture import Captured, CaptureResult, capture
from moeify.passes.match import FFNMatch, Rejection
from moeify.passes.rules import RULES
from moeify.passes.rules.common import Candidate, linear_ref

META = "moeify.analyse"


@dataclass(frozen=True)
class Site:
    """A found FFN and what the rewrite needs: the candidate (graph and nodes), the rule that matched it,
    and the surgery chosen for it (executed by rewrite as it stands)."""

    match: FFNMatch
    cand: Candidate
    rule: object
    surgery: plan.Surgery
    order: tuple


@dataclass(frozen=True)
class Analysis:
    """What analyse produced: the FFNs found (in module order) and the candidates rejected, with why."""

    sites: tuple[Site, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    capture: CaptureResult | None = None

    @property
    def matches(self) -> list[FFNMatch]:
        return [s.match for s in self.sites]

    @property
    def by_rule(self) -> dict[str, int]:
        """Rule name -> FFNs it found."""
        counts: dict[str, int] = {}
        for s in self.sites:
            counts[s.match.rule] = counts.get(s.match.rule, 0) + 1
        return counts

    @property
    def summary(self) -> str:
        kinds = ", ".join(f"{n} {r}" for r, n in sorted(self.by_rule.items()))
        return (
            f"analyse: found {len(self.sites)} FFNs{f' ({kinds})' if kinds else ''}, "
            f"{len(self.rejections)} candidates rejected"
        )


@dataclass(frozen=True)
class Analyse:
    """The analyse pass: find the FFNs in `captured` (captured here when None)."""

    name: ClassVar[str] = "analyse"
    modifies_model: ClassVar[bool] = False
    preserves_computation: ClassVar[bool] = True
    captured: CaptureResult | None = None

    def run(self, model: nn.Module) -> Analysis:
        return analyse(model, self.captured)


def _rank(cap: Captured) -> tuple:
    """Smaller is better: deepest module first, real graphs before fixed-default ones, forward first."""
    depth = cap.path.count(".") + 1 if cap.path else 0
    return (cap.concrete, -depth, cap.method != "forward")


def is_causal(model: nn.Module, path: str) -> bool:
    """Does the module at `path` sit in a causal decoder?

    Yes when an ancestor says it is a decoder (`is_decoder`, T5's decoder stack, an HF config with
    is_decoder), is a torch TransformerDecoder(Layer), or the model is an HF model that generates and is
    not encoder-decoder; otherwise the nearest enclosing module with attention that declares
    `is_causal` decides.
    """
    parts = path.split(".") if path else []
    chain = [model] + [model.get_submodule(".".join(parts[: i + 1])) for i in range(len(parts))]
    for m in chain:
        cfg = getattr(m, "config", None)
        if getattr(m, "is_decoder", None) is True or getattr(cfg, "is_decoder", None) is True:
            return True
        if isinstance(m, (nn.TransformerDecoderLayer, nn.TransformerDecoder)):
            return True
    cfg = getattr(model, "config", None)
    if cfg is not None and not getattr(cfg, "is_encoder_decoder", False):
        can_generate = getattr(model, "can_generate", None)
        if callable(can_generate) and can_generate():
            return True
    for m in reversed(chain[1:]):  # nearest first; the root would mix an encoder's and a decoder's flags
        flags = [sub.is_causal for sub in m.modules() if isinstance(getattr(sub, "is_causal", None), bool)]
        if flags:
            return any(flags)
    return False


def _candidates(cap: Captured):
    for node in cap.graph.nodes:
        if linear_ref(node, cap) is None:
            continue
        for rule in RULES:
            cand = rule.pattern(node, cap)
            if cand is not None:
                yield rule, cand, rule.check(cand)
                break


def _roles(c: Candidate) -> dict:
    roles = {c.up: "up", c.act: "act", c.down: "down"}
    if c.gate is not None and c.gate is not c.up:
        roles[c.gate] = "gate"
    return roles


def _unanalysed(model: nn.Module, result: CaptureResult, covered: set[str]) -> list[Rejection]:
    """Modules that look like an FFN (2+ linear children and an activation) but whose code nobody traced."""
    out = []
    for path, reason in result.failures.items():
        module = model.get_submodule(path)
        linears = [n for n, c in module.named_children() if is_linear_module(c)]
        acts = [n for n, c in module.named_children() if is_activation_module(c)]
        if len(linears) < 2 or not acts:
            continue
        if any((f"{path}.{n}" if path else n) in covered for n in linears):
            continue
        out.append(
            Rejection(
                path,
                f"its forward did not trace ({reason}) and no method computing its "
                f"projections ({', '.join(linears)}) traced either; not analysed",
            )
        )
    return out


def analyse(model: nn.Module, captured: CaptureResult | None = None) -> Analysis:
    """Find the FFNs of `model` (and the candidates rejected, with reasons)."""
    captured = captured if captured is not None else capture(model)
    by_key: dict[tuple, list] = {}
    module_order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    covered: set[str] = set()
    for cap in captured.graphs:
        covered |= {cap.full(n.target) for n in cap.graph.nodes if n.op == "call_module"}
        for rule, cand, reason in _candidates(cap):
            by_key.setdefault(cand.key, []).append((rule, cand, reason))

    sites: list[Site] = []
    rejections: list[Rejection] = []
    seen_rejections: set[tuple] = set()
    for entries in by_key.values():
        entries.sort(key=lambda e: _rank(e[1].cap))
        chosen = None
        reasons = []
        for rule, cand, reason in entries:
            if reason is not None:
                reasons.append(reason)
                continue
            surgery, why_not = plan.choose(cand, rule)
            if surgery is None:
                reasons.append(
                    f"matched rule {rule.NAME!r} at {cand.cap.site} but no safe rewrite: {why_not}"
                )
                continue
            chosen = (rule, cand, surgery)
            break
        first = entries[0][1]
        if chosen is None:
            rej = Rejection(first.cap.path, reasons[0])
            if (rej.name, rej.reason) not in seen_rejections:
                seen_rejections.add((rej.name, rej.reason))
                rejections.append(rej)
            continue
        rule, cand, surgery = chosen
        up, gate, down = cand.up_ref, cand.gate_ref, cand.down_ref
        match = FFNMatch(
            name=cand.cap.path,
            d_model=up.in_features,
            d_ff=down.in_features,
            activation=cand.activation,
            gated=gate is not None,
            bias=any(r is not None and r.bias is not None for r in (up, gate, down)),
            up=up,
            down=down,
            gate=gate,
            rule=rule.NAME,
            site=cand.cap.site,
            rewrite=surgery.name,
            causal=is_causal(model, cand.cap.path),
        )
        order = (module_order.get(cand.cap.path, 0), list(cand.cap.graph.nodes).index(cand.down))
        sites.append(Site(match, cand, rule, surgery, order))
    sites = _name_uniquely(sorted(sites, key=lambda s: s.order))
    for site in sites:
        for node, role in _roles(site.cand).items():
            node.meta[META] = {"ffn": site.match.name, "role": role, "rule": site.match.rule}
    rejections.extend(_unanalysed(model, captured, covered))
    return Analysis(tuple(sites), tuple(rejections), captured)


def _name_uniquely(sites: list[Site]) -> list[Site]:
    """Two FFNs in one module (rare) get `name#1`, `name#2`, ... after the first."""
    seen: dict[str, int] = {}
    out = []
    for site in sites:
        n = seen.get(site.match.name, 0)
        seen[site.match.name] = n + 1
        if n:
            site = replace(site, match=replace(site.match, name=f"{site.match.name}#{n}"))
        out.append(site)
    return out


def activation_module(site_or_model, match: FFNMatch | None = None) -> nn.Module:
    """An nn.Module computing a found FFN's activation exactly (see `moeify.passes.activation`):
    `activation_module(site)` for a Site of `analyse(model)`, or `activation_module(model, match)` for an
    FFNMatch of `find_ffns(model)` (analyses the model again)."""
    if match is None:
        return activation.activation_module(site_or_model)
    found = [s for s in analyse(site_or_model).sites if s.match.name == match.name]
    if not found:
        raise ValueError(f"no FFN named {match.name!r} in this model; pass a match of find_ffns(model)")
    return activation.activation_module(found[0])

