"""`export_genai`: GenAI folders of converted tiny LLaMAs generate what transformers generates.

Each builder run takes ~40 s on a 2-core machine, so one test runs the whole `export_genai` and the others
reuse one builder folder of the same dense skeleton (`moe_folder_from_dense`): their models are converted
from the same dense LLaMA, so everything but the MLPs (which surgery replaces) is the same.
"""

import numpy as np
import pytest
import torch

import moeify
from moeify.errors import MoeifyError
from moeify.genai import export_genai
from moeify.genai.builder import run_builder
from moeify.genai.export import moe_folder_from_dense
from moeify.genai.skeleton import moe_sites, write_skeleton
from tests.genai.tiny import genai_greedy, prompt_ids, tiny_llama_folder, transformers_greedy

pytestmark = [pytest.mark.slow, pytest.mark.ort]
TOTAL = 32  # tokens in a generated sequence, prompt included


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """(the tiny dense LLaMA, its HF folder with the tokenizer)."""
    folder = tmp_path_factory.mktemp("dense")
    return tiny_llama_folder(folder), folder


@pytest.fixture(scope="module")
def built(dense, tmp_path_factory):
    """The builder's fp32 folder of the E=4 skeleton (expert width = dense width: any copy-upcycled model)."""
    model, folder = dense
    moe = moeify.convert(model, experts=4, k=1, init="copy")
    scratch = tmp_path_factory.mktemp("built")
    write_skeleton(moe, moe_sites(moe), scratch / "hf", folder)
    run_builder(scratch / "hf", scratch / "out", "fp32", "cpu", scratch / "cache")
    return scratch / "out"


def train_a_few_steps(moe, steps: int = 8) -> None:
    """Adam on the MoE layers only (router and experts), LM loss on random tokens: routing and experts
    move."""
    params = [p for m in moe.modules() if isinstance(m, moeify.MoELayer) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=3e-2)
    ids = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    moe.train()
    for _ in range(steps):
        loss = moe(input_ids=ids, labels=ids).loss + moeify.aux_loss(moe)
        opt.zero_grad()
        loss.backward()
        opt.step()
    moe.eval()


def test_export_genai_generates_like_transformers_grouped_query_attention(dense, tmp_path):
    model, folder = dense
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    moe = moeify.convert(model, experts=4, k=1, init="copy")
    out = export_genai(moe, tmp_path / "genai", tokenizer_dir=folder)
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MoE" for n in graph.node) == 4
    assert not any("/mlp/" in n.name for n in graph.node)
    assert any(n.op_type == "GroupQueryAttention" for n in graph.node)
    prompt = prompt_ids()
    want = transformers_greedy(moe, prompt, TOTAL)
    assert genai_greedy(out, prompt, TOTAL) == want
    assert want == transformers_greedy(model, prompt, TOTAL)  # copied experts: the dense model's tokens


@pytest.mark.parametrize("experts_op", ["fused", "loop"])
@pytest.mark.parametrize("k", [1, 2])
def test_copied_experts_generate_the_dense_tokens(dense, built, tmp_path, k, experts_op):
    model, _ = dense
    moe = moeify.convert(model, experts=4, k=k, init="copy")
    out = moe_folder_from_dense(moe, built, tmp_path / "genai", precision="fp32", experts_op=experts_op)
    prompt = prompt_ids(seed=k)
    assert genai_greedy(out, prompt, TOTAL) == transformers_greedy(model, prompt, TOTAL)


@pytest.mark.parametrize("score_fn,experts_op", [("softmax", "fused"), ("sigmoid", "fused"), ("sigmoid", "loop")])
def test_trained_router_generates_like_transformers(dense, built, tmp_path, score_fn, experts_op):
    model, _ = dense
    moe = moeify.convert(model, experts=4, k=2, init="copy", layer={"score_fn": score_fn})
    train_a_few_steps(moe)
    out = moe_folder_from_dense(moe, built, tmp_path / "genai", precision="fp32", experts_op=experts_op)
    prompt = prompt_ids(seed=3)
    want = transformers_greedy(moe, prompt, TOTAL)
    assert want != transformers_greedy(model, prompt, TOTAL)  # training changed the model's tokens
    assert genai_greedy(out, prompt, TOTAL) == want


def test_every_other_layer_keeps_its_dense_mlp(dense, built, tmp_path):
    import onnx

    model, _ = dense
    moe = moeify.convert(model, experts=4, k=2, init="copy", every=2)  # layers 1 and 3
    train_a_few_steps(moe)
    out = moe_folder_from_dense(moe, built, tmp_path / "genai", precision="fp32")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert sorted(n.name for n in graph.node if n.op_type == "MoE") == ["/model/layers.1/moe/MoE",
                                                                          "/model/layers.3/moe/MoE"]
    assert {n.name.split("/")[2] for n in graph.node if "/mlp/" in n.name} == {"layers.0", "layers.2"}
    prompt = prompt_ids(seed=5)
    want = transformers_greedy(moe, prompt, TOTAL)
    assert want != transformers_greedy(model, prompt, TOTAL)
    assert genai_greedy(out, prompt, TOTAL) == want


@pytest.mark.parametrize("experts_op", ["fused", "loop"])
def test_hash_router_generates_like_transformers(dense, built, tmp_path, experts_op):
    model, _ = dense
    moe = moeify.convert(model, experts=4, k=2, init="copy", router="hash")
    train_a_few_steps(moe)  # the experts differ, so a wrong table would change tokens
    out = moe_folder_from_dense(moe, built, tmp_path / "genai", precision="fp32", experts_op=experts_op)
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    gathers = [
        n for n in graph.node if n.op_type == "Gather" and "input_ids" in n.input and "/moe/" in n.name
    ]
    assert len(gathers) == 4 and len({n.input[0] for n in gathers}) == 1  # one shared table
    prompt = prompt_ids(seed=4)
    want = transformers_greedy(moe, prompt, TOTAL)
    assert want != transformers_greedy(model, prompt, TOTAL)
    assert genai_greedy(out, prompt, TOTAL) == want


def test_int8_experts_stay_close_to_fp32(dense, built, tmp_path):
    """int8 experts (loop: MatMulNBits) in the fp32 builder graph: the first step's logits stay within 5% (of
    the logits' range) of the fp32 MoE folder's; int4 loop and int4 QMoE within 25%; the op-level parity
    tests (test_quantize, test_expert_loop) hold the layouts tightly."""
    import onnxruntime_genai as og

    model, _ = dense
    moe = moeify.convert(model, experts=4, k=2, init="copy")
    train_a_few_steps(moe)
    logits = {}
    for name in ("fp32", "int8", "int4", "int4 fused"):
        precision, _, op = name.partition(" ")
        out = moe_folder_from_dense(moe, built, tmp_path / name.replace(" ", "-"), precision=precision,
                                    experts_op=op or "auto")
        gen_model = og.Model(str(out))
        params = og.GeneratorParams(gen_model)
        generator = og.Generator(gen_model, params)
        generator.append_tokens(prompt_ids().numpy().astype(np.int32))
        logits[name] = np.asarray(generator.get_logits())[0, -1]  # [V]
    span = logits["fp32"].max() - logits["fp32"].min()
    assert np.abs(logits["int8"] - logits["fp32"]).max() <= 0.05 * span
    for name in ("int4", "int4 fused"):
        assert np.abs(logits[name] - logits["fp32"]).max() <= 0.25 * span
        assert np.abs(logits[name] - logits["fp32"]).max() > 0  # the experts were quantised


# --- refusals (before the builder runs: fast) -------------------------------------------------------------


def test_unnormalised_top_k_is_refused(dense, tmp_path):
    model, folder = dense
    moe = moeify.convert(model, experts=4, k=2, init="copy", layer={"normalize": False})
    with pytest.raises(MoeifyError, match="does not renormalise"):  # auto: the own route takes it
        export_genai(moe, tmp_path / "g", tokenizer_dir=folder, route="builder")


def test_random_router_averaging_all_experts_is_refused(dense, tmp_path):
    model, folder = dense
    moe = moeify.convert(
        model, experts=4, k=2, init="copy", router="random", layer={"random_eval_rule": "mean"}
    )
    with pytest.raises(MoeifyError, match="has no com.microsoft.MoE lowering"):
        export_genai(moe, tmp_path / "g", tokenizer_dir=folder, route="builder")


def test_router_that_mixes_tokens_is_refused():
    from moeify.genai.router_logits import router_logits

    layer = moeify.MoELayer(
        moeify.MoEConfig(
            d_model=16,
            d_ff=32,
            num_experts=4,
            k=1,
            router="expert_choice",
            activation="silu",
            gated=True,
            bias=False,
        )
    ).eval()
    with pytest.raises(MoeifyError, match="mixes tokens"):
        router_logits(layer, 256, "layers.0.mlp")


def test_architecture_the_builder_does_not_know_is_refused(tmp_path):
    from tests.zoo import ZOO

    moe = moeify.convert(ZOO["gpt2"].build(), experts=4, k=1, init="copy")
    with pytest.raises(MoeifyError, match="builder route covers .*, not GPT2LMHeadModel"):
        export_genai(moe, tmp_path / "g", tokenizer_dir=tmp_path, route="builder")


def test_fp16_on_cpu_and_missing_tokenizer_are_refused(dense, tmp_path):
    model, _ = dense
    moe = moeify.convert(model, experts=4, k=1, init="copy")
    with pytest.raises(MoeifyError, match="fp16 decoders for CUDA only"):
        export_genai(moe, tmp_path / "g", precision="fp16", tokenizer_dir=tmp_path)
    with pytest.raises(MoeifyError, match="no tokenizer files"):
        export_genai(moe, tmp_path / "g", tokenizer_dir=tmp_path)
    assert not (tmp_path / "g").exists()
