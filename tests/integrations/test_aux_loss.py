"""`ConvertConfig.add_aux_loss`: a converted model's returned loss carries its routers' aux losses while
training (as Mixtral's does), reported as `aux_loss`; eval outputs are unchanged."""

import copy
import pickle

import pytest
import torch

import moeify
from moeify.integrations.aux_loss import has_aux_loss_hook, install_aux_loss_hook, remove_aux_loss_hook

pytest.importorskip("transformers")


def _ids(seed=0, batch=2, seq=12):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _llama(**options):
    from moeify.zoo import tiny_llama

    return moeify.convert(tiny_llama(num_hidden_layers=2), experts=4, k=2, **options)


def _task_loss(model, ids):
    """The plain causal-LM loss of `model`'s logits, computed outside the model."""
    logits = model(ids).logits  # [B, S, V]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_train_loss_is_task_loss_plus_aux_loss_and_reaches_the_router():
    model = _llama().train()
    ids = _ids()
    torch.manual_seed(0)
    out = model(ids, labels=ids)
    aux = moeify.aux_loss(model)
    assert aux.item() > 0 and out.aux_loss is not None
    torch.testing.assert_close(out.aux_loss, aux, rtol=0, atol=0)
    with torch.no_grad():
        torch.manual_seed(0)
        plain = remove_aux_loss_hook(copy.deepcopy(model))
        task = plain(ids, labels=ids).loss
    torch.testing.assert_close(task, _task_loss(plain, ids))  # what the hook adds to
    torch.testing.assert_close(out.loss, task + aux)
    out.loss.backward()
    routers = [m.router.weight.grad for m in model.modules() if isinstance(m, moeify.MoELayer)]
    assert routers and all(g is not None and g.abs().sum() > 0 for g in routers)
    # The router's gradient carries the aux loss: it differs from the task loss's gradient alone.
    plain.zero_grad()
    torch.manual_seed(0)
    plain.train()(ids, labels=ids).loss.backward()
    first = next(m for m in model.modules() if isinstance(m, moeify.MoELayer)).router.weight.grad
    first_plain = next(m for m in plain.modules() if isinstance(m, moeify.MoELayer)).router.weight.grad
    assert not torch.allclose(first, first_plain)


def test_eval_outputs_are_unchanged():
    model = _llama().eval()
    ids = _ids()
    with torch.no_grad():
        out = model(ids, labels=ids)
        plain = remove_aux_loss_hook(copy.deepcopy(model))(ids, labels=ids)
    assert "aux_loss" not in out and getattr(out, "aux_loss", None) is None
    assert torch.equal(out.loss, plain.loss) and torch.equal(out.logits, plain.logits)


def test_no_labels_no_loss_but_aux_loss_is_reported():
    model = _llama().train()
    out = model(_ids())
    assert out.loss is None
    torch.testing.assert_close(out.aux_loss, moeify.aux_loss(model), rtol=0, atol=0)


def test_switched_off_in_convert_config():
    model = _llama(add_aux_loss=False).train()
    assert not has_aux_loss_hook(model)
    ids = _ids()
    torch.manual_seed(0)
    out = model(ids, labels=ids)
    assert getattr(out, "aux_loss", None) is None
    torch.testing.assert_close(out.loss, _task_loss(model.eval(), ids))  # no dropout in the tiny LLaMA


def test_zero_coefficients_leave_the_loss_alone():
    model = _llama(layer={"aux_loss_coef": 0.0, "z_loss_coef": 0.0}).train()
    ids = _ids()
    out = model(ids, labels=ids)
    assert getattr(out, "aux_loss", None) is None
    torch.testing.assert_close(out.loss, _task_loss(model, ids))


def test_dict_outputs_and_tensor_outputs():
    from moeify.zoo import tiny_mlp

    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_mlp()

        def forward(self, ids):
            logits = self.net(ids)  # [B, S, V]
            return {"loss": logits.logsumexp(-1).mean(), "logits": logits}

    ids = _ids() % 128
    dict_model = moeify.convert(DictModel(), experts=4, k=1).train()
    out = dict_model(ids)
    torch.testing.assert_close(out["loss"], out["logits"].logsumexp(-1).mean() + moeify.aux_loss(dict_model))
    tensor_model = moeify.convert(tiny_mlp(), experts=4, k=1).train()
    assert has_aux_loss_hook(tensor_model)
    assert isinstance(tensor_model(ids), torch.Tensor)  # nothing to add to: returned unchanged


def test_install_is_idempotent_and_survives_deepcopy_and_pickle():
    model = _llama()
    install_aux_loss_hook(model)
    assert sum(1 for _ in model._forward_hooks.values()) == 1
    ids = _ids()
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert has_aux_loss_hook(twin)
        out = twin.train()(ids, labels=ids)
        # The hook reads the copy's layers, not the original's (which has not run).
        torch.testing.assert_close(out.aux_loss, moeify.aux_loss(twin), rtol=0, atol=0)
        assert all(m.last_aux_loss is None for m in model.modules() if isinstance(m, moeify.MoELayer))


def test_survives_save_and_load(tmp_path):
    model = _llama()
    again = moeify.load(moeify.save(model, tmp_path / "out"))
    assert has_aux_loss_hook(again)
    ids = _ids()
    out = again.train()(ids, labels=ids)
    torch.testing.assert_close(out.aux_loss, moeify.aux_loss(again), rtol=0, atol=0)
    off = moeify.load(moeify.save(_llama(add_aux_loss=False), tmp_path / "off"))
    assert not has_aux_loss_hook(off)


def test_save_pretrained_of_a_converted_model_still_works(tmp_path):
    model = _llama()
    model.save_pretrained(tmp_path / "hf")  # the hook holds no state: nothing new to write
    assert (tmp_path / "hf" / "config.json").exists()
    assert has_aux_loss_hook(model)


def test_config_field_validates_and_round_trips():
    cfg = moeify.ConvertConfig(experts=4, add_aux_loss=False)
    assert moeify.ConvertConfig.from_json(cfg.to_json()) == cfg
    assert moeify.ConvertConfig().add_aux_loss is True
    with pytest.raises(moeify.ConfigError, match="add_aux_loss must be True or False"):
        moeify.ConvertConfig(add_aux_loss="yes")


def test_recipes_written_before_the_field_load_with_it_on():
    from pathlib import Path

    from moeify.io.recipe import recorded_config

    old = moeify.ConvertConfig(experts=4).to_dict()
    del old["add_aux_loss"]  # a version-2 recipe from before this field
    assert recorded_config({"config": old}, 2).add_aux_loss is True
    v1 = moeify.load(Path(__file__).parents[1] / "io" / "fixtures" / "recipe_v1")
    assert has_aux_loss_hook(v1)
