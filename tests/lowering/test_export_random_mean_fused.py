"""THOR's random router at inference with the "mean" rule (every expert, weight 1/E) on ONNX Runtime's fused
com.microsoft.MoE: the op with k=E and equal router_probs, normalize_routing_weights=1. Exact: parity
<= 1e-4 with PyTorch for a converted tiny decoder."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import moeify
from moeify.lowering.ops.ort_moe import MSFT_DOMAIN
from moeify.runtime import make_session, run
from tests.lowering.test_export_hash_fused import E, V, TinyDecoder


@pytest.mark.slow
def test_random_mean_decoder_on_fused_moe_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    model = moeify.convert(TinyDecoder().eval(), experts=E, k=1, router="random", init="noise",
                           layer={"random_eval_rule": "mean"}).eval()
    result = moeify.export_onnx(model, {"input_ids": torch.randint(0, V, (2, 6))}, tmp_path / "r.onnx",
                                target="ort")
    assert set(result.layers.values()) == {"com.microsoft.MoE"} and len(result.layers) == 2, result.reasons

    fused = [n for n in onnx.load(result.path).graph.node if n.domain == MSFT_DOMAIN and n.op_type == "MoE"]
    assert len(fused) == 2
    for node in fused:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k"] == E and attrs["normalize_routing_weights"] == 1  # every expert, not config.k

    session = make_session(result.path)
    for batch, seq in [(1, 1), (3, 13)]:
        ids = torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            want = model(ids).numpy()
        got = next(iter(run(session, {"input_ids": ids.numpy()}).values()))
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), f"{batch}x{seq}"
