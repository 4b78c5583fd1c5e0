"""Select: which of the FFNs found are converted (include/exclude globs, a filter function, every n-th).

Nothing here changes the model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from moeify.config import ConfigError
from moeify.passes.analyse import Site


@dataclass(frozen=True)
class SelectResult:
    sites: tuple[Site, ...]  # the selected FFNs, in module order
    found: int
    note: str = ""  # the options that narrowed the selection ("" when none did)

    @property
    def summary(self) -> str:
        return f"select: {len(self.sites)}/{self.found} FFNs selected{f' ({self.note})' if self.note else ''}"


@dataclass(frozen=True)
class Select:
    """The select pass: include globs, then exclude globs, then filter_fn(module, name); then every n-th
    of what is left (the n-th, 2n-th, ... in module order: every=2 converts FFNs 2, 4, 6, ...).

    Globs are fnmatch patterns on FFN names (`FFNMatch.name`); an include pattern that matches no FFN
    is a ConfigError (a typo would otherwise convert nothing it names).
    """

    name: ClassVar[str] = "select"
    modifies_model: ClassVar[bool] = False
    preserves_computation: ClassVar[bool] = True
    sites: tuple[Site, ...]
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    every: int = 1

    @property
    def note(self) -> str:
        """The options that narrow the selection, as the report shows them ("" when none does)."""
        options = (("include", self.include), ("exclude", self.exclude), ("every", self.every))
        parts = [f"{k}={v!r}" for k, v in options if v not in (None, 1)]
        return ", ".join(parts + (["filter_fn"] if self.filter_fn else []))

    def run(self, model: nn.Module) -> SelectResult:
        names = [s.match.name for s in self.sites]
        chosen = list(self.sites)

        def matches(site: Site, patterns: Sequence[str]) -> bool:
            return any(fnmatch.fnmatchcase(site.match.name, p) for p in patterns)

        if self.include is not None:
            for pattern in self.include:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    raise ConfigError(
                        f"include pattern {pattern!r} matches no FFN; FFNs found: "
                        f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
                    )
            chosen = [s for s in chosen if matches(s, self.include)]
        if self.exclude is not None:
            chosen = [s for s in chosen if not matches(s, self.exclude)]
        if self.filter_fn is not None:  # filter_fn(the FFN's module, its name); name#1 lives in name
            owner = lambda site: model.get_submodule(site.match.name.split("#")[0])  # noqa: E731
            chosen = [s for s in chosen if self.filter_fn(owner(s), s.match.name)]
        every = self.every
        selected = tuple(s for i, s in enumerate(chosen) if i % every == every - 1)
        return SelectResult(selected, len(self.sites), self.note)
