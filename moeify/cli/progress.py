"""Conversion with a progress bar over the FFNs being converted."""

from __future__ import annotations

from torch import nn

from moeify.cli.common import count_progress


def convert_with_progress(model: nn.Module, options: dict) -> nn.Module:
    import moeify

    with count_progress("converting", None) as advance:
        model = moeify.convert(model, **options, inplace=True)
        for name in moeify.conversion_report(model).converted:
            advance(name)
    return model
