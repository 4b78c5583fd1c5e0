"""Conversion with a progress bar over the FFNs being converted."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from moeify.cli.common import count_progress

if TYPE_CHECKING:
    from moeify.convert_config import ConvertConfig


def convert_with_progress(model: nn.Module, config: ConvertConfig) -> nn.Module:
    """`moeify.convert(model, config, inplace=True)`, advancing a bar as each layer is built."""
    import moeify

    with count_progress("converting", None) as advance:
        return moeify.convert(model, config, inplace=True,
                              progress=lambda name, done, total: advance(name or "<model>", total))
