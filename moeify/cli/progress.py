"""Conversion with a progress bar over the FFNs being converted."""

from __future__ import annotations

from torch import nn

from moeify.cli.common import count_progress


def convert_with_progress(model: nn.Module, options: dict) -> nn.Module:
    """`moeify.convert(model, **options, inplace=True)`, advancing a bar as each layer is built."""
    import moeify

    with count_progress("converting", None) as advance:
        return moeify.convert(model, **options, inplace=True,
                              progress=lambda name, done, total: advance(name or "<model>", total))
