"""int8/int4 on the own route (moeify.genai.own_quant): a tiny GPT-2 (the builder does not know it; non-gated
gelu experts with biases, Conv1D linears exported as Gemm, tied lm_head) converted to E=4 k=2, its router
trained a few steps.

Two exports per module (each ~50-150 s on a loaded 2-core machine): fp32 and int4 through `export_genai`.
The int8 folder and the int4 one with QMoE experts are quantised from the fp32 folder's graph by
`write_quantised`, the function `export_genai` runs after its fp32 export at int8/int4 (so only the
precision string differs from the int4 export).
"""

import shutil

import numpy as np
import onnx
import pytest

import moeify
from moeify.genai import export_genai
from moeify.genai.own_route import DATA_FILE, MODEL_FILE, write_quantised
from tests.genai.test_export import train_a_few_steps
from tests.genai.test_own_route import tiny_gpt2
from tests.genai.tiny import genai_greedy, prompt_ids, save_byte_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.ort]
LAYERS, EXPERTS = 2, 4
DENSE_LINEARS = 2 * LAYERS + 1  # c_attn and c_proj per layer, lm_head
TOTAL = 24  # tokens in a generated sequence, prompt included


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"fp32", "int8", "int4", "int4 fused"}: the GenAI folders of one converted GPT-2 (width 128: wide
    enough that its weights, not the graph's nodes, make most of a folder's size)."""
    root = tmp_path_factory.mktemp("own-quant")
    save_byte_tokenizer(root / "tokenizer")
    moe = moeify.convert(tiny_gpt2(n_embd=128), experts=EXPERTS, k=2, init="copy")
    train_a_few_steps(moe)
    tokenizer = root / "tokenizer"
    out = {p: export_genai(moe, root / p, precision=p, tokenizer_dir=tokenizer) for p in ("fp32", "int4")}
    for name, precision, op in (("int8", "int8", "auto"), ("int4 fused", "int4", "fused")):
        folder = root / name.replace(" ", "-")
        shutil.copytree(out["fp32"], folder, ignore=shutil.ignore_patterns(MODEL_FILE, DATA_FILE))
        write_quantised(out["fp32"] / MODEL_FILE, folder / MODEL_FILE, precision, op, "cpu")
        out[name] = folder
    return out


def nodes(folder):
    return onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph.node


def attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("name, bits", [("int4", 4), ("int8", 8)])
def test_loop_folders_hold_matmulnbits_for_dense_and_expert_weights(folders, name, bits):
    graph = onnx.load(str(folders[name] / MODEL_FILE), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    experts = [n for n in nbits if "/moe/e" in n.name]
    assert len(experts) == LAYERS * EXPERTS * 2  # fc1 and fc2 of every expert
    assert len(nbits) - len(experts) == DENSE_LINEARS
    settings = {(attrs(n)["bits"], attrs(n)["block_size"], attrs(n)["accuracy_level"]) for n in nbits}
    assert settings == {(bits, 32, 4)}
    assert not [n for n in graph.node if n.op_type in ("MoE", "QMoE", "Gemm")]
    # what stays float: the routers (a [D, E] weight) and attention's activation-by-activation products
    float_weights = [n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert len(float_weights) == LAYERS
    embedding = next(n for n in graph.node if n.op_type == "Gather" and n.input[0].endswith("lm_head.weight"))
    assert embedding.input[0] in weights  # the token embedding stays a float table


def test_fused_folder_holds_qmoe(folders):
    graph_nodes = nodes(folders["int4 fused"])
    qmoe = [n for n in graph_nodes if n.op_type == "QMoE"]
    assert len(qmoe) == LAYERS
    assert {(attrs(n)["expert_weight_bits"], attrs(n)["activation_type"]) for n in qmoe} == {(4, b"gelu")}
    assert sum(n.op_type == "MatMulNBits" for n in graph_nodes) == DENSE_LINEARS


def test_quantised_folders_generate_close_to_fp32(folders):
    """The first step's logits stay within 5% (int8) / 25% (int4) of the fp32 folder's range (measured at
    width 64: 0.6% and 4.8%); every folder generates with ONNX Runtime GenAI."""
    import onnxruntime_genai as og

    prompt = prompt_ids()
    logits = {}
    for name, folder in folders.items():
        model = og.Model(str(folder))
        generator = og.Generator(model, og.GeneratorParams(model))
        generator.append_tokens(prompt.numpy().astype(np.int32))
        logits[name] = np.asarray(generator.get_logits())[0, -1]  # [V]
        tokens = genai_greedy(folder, prompt, TOTAL)
        assert len(tokens) > prompt.shape[1] and all(0 <= t < 256 for t in tokens)
    span = logits["fp32"].max() - logits["fp32"].min()
    for name, bound in (("int8", 0.05), ("int4", 0.25), ("int4 fused", 0.25)):
        error = np.abs(logits[name] - logits["fp32"]).max()
        assert 0 < error <= bound * span, (name, error / span)


def test_int4_folder_is_at_most_a_third_of_fp32(folders):
    def size(folder):
        return sum(f.stat().st_size for f in folder.iterdir())

    assert size(folders["int4"]) <= 0.35 * size(folders["fp32"])
    assert size(folders["int8"]) < size(folders["fp32"]) * 0.6


# --- the graph rewrites on a hand-made graph (fast) -------------------------------------------------------


def test_gemm_and_transposed_weights_become_matmulnbits(caplog):
    """Gemm(x, W^T, b) (transB=1) and MatMul(h, Transpose(V)) -> MatMulNBits: the output stays within int8
    rounding of the fp32 graph's; a node of moeify's own ops is kept, with a warning that its experts stay
    float."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from moeify.genai.own_quant import quantize_own_graph

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 64)).astype(np.float32) / 8  # [N, K] read transposed by Gemm
    b = rng.standard_normal(32).astype(np.float32)
    v = rng.standard_normal((16, 32)).astype(np.float32) / 6  # [N, K] read through a Transpose
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="gemm", transB=1),
            helper.make_node("Transpose", ["v"], ["vT"], name="t", perm=[1, 0]),
            helper.make_node("MatMul", ["h", "vT"], ["y0"], name="mm"),
            helper.make_node("Identity", ["y0"], ["y"], name="experts_stand_in", domain="moeify"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(a, n) for n, a in (("w", w), ("b", b), ("v", v))],
    )
    model = helper.make_model(
        graph, ir_version=8, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("moeify", 1)]
    )
    x = rng.standard_normal((5, 64)).astype(np.float32)
    want = (x @ w.T + b) @ v.T  # [5, 16]
    with caplog.at_level("WARNING", logger="moeify.genai.own_quant"):
        quantized = quantize_own_graph(model, "int8")
    assert "1 node(s) of moeify's own ops keep their weights float" in caplog.text
    assert [n.op_type for n in quantized.graph.node] == ["MatMulNBits", "Add", "MatMulNBits", "Identity"]
    assert {t.name for t in quantized.graph.initializer} & {"w", "v"} == set()  # float copies dropped
    quantized.graph.node[-1].domain = ""  # the stand-in for moeify's ops runs as a plain Identity
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    assert 0 < np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


def gated_moe_graph(normalize: bool):
    """x [T, D] -> router MatMul -> com.microsoft.MoE (SwiGLU, fc1 interleaved by a Gather as the ort_moe
    lowering writes it, biases) -> y, and an input x."""
    from onnx import TensorProto, helper, numpy_helper

    from moeify.lowering.ops.ort_moe import ort_attributes, swiglu_row_order

    E, H, D, T = 4, 32, 64, 7
    rng = np.random.default_rng(1)
    arrays = {
        "router": rng.standard_normal((D, E)).astype(np.float32),
        "w1": (rng.standard_normal((E, 2 * H, D)) / 8).astype(np.float32),  # rows [gate; up]
        "b1": (rng.standard_normal((E, 2 * H)) / 4).astype(np.float32),
        "w2": (rng.standard_normal((E, D, H)) / 6).astype(np.float32),
        "b2": (rng.standard_normal((E, D)) / 4).astype(np.float32),
        "order": np.array(swiglu_row_order(H), dtype=np.int64),
    }
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "router"], ["logits"], name="router"),
            helper.make_node("Gather", ["w1", "order"], ["fc1"], name="interleave_w1", axis=1),
            helper.make_node("Gather", ["b1", "order"], ["fc1_bias"], name="interleave_b1", axis=1),
            helper.make_node("MoE", ["x", "logits", "fc1", "fc1_bias", "w2", "b2"], ["y"], name="moe",
                             domain="com.microsoft", **ort_attributes(2, normalize, "silu", True)),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", D])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 18),
                                                                  helper.make_opsetid("com.microsoft", 1)])
    return model, rng.standard_normal((T, D)).astype(np.float32)


@pytest.mark.parametrize("normalize", [True, False])
def test_gated_moe_node_becomes_loop_or_qmoe_experts(normalize):
    """A gated MoE node (the own route's LLaMA-style layers) quantised both ways: within int8 / int4 rounding
    of the fp32 node's output; the router stays a float MatMul."""
    import onnxruntime as ort

    from moeify.genai.own_quant import quantize_own_graph

    def run(model, x):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    model, x = gated_moe_graph(normalize)
    want = run(model, x)
    for precision, op, bound in (("int8", "loop", 3e-2), ("int4", "loop", 0.2), ("int4", "fused", 0.2)):
        quantized = quantize_own_graph(gated_moe_graph(normalize)[0], precision, op)
        kinds = [n.op_type for n in quantized.graph.node]
        assert "MoE" not in kinds and kinds.count("MatMul") == 1
        assert {t.name for t in quantized.graph.initializer} & {"w1", "b1", "order"} == set()  # Gathers gone
        assert kinds.count("MatMulNBits" if op == "loop" else "QMoE") == (8 if op == "loop" else 1)
        error = np.abs(run(quantized, x) - want).max()
        assert 0 < error <= bound * np.abs(want).max(), (precision, op, error / np.abs(want).max())
