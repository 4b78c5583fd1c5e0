"""Small models for the CLI and io tests, importable as `tests.cli_models:NAME` (module:callable)."""

import torch
from torch import nn

from moeify.zoo import MLP


class UserModel(nn.Module):
    """A class outside torch.nn: a pickle of it runs this module's code when loaded."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.mlp = MLP(16, 32)

    def forward(self, ids):
        x = self.embed(ids)
        return x + self.mlp(x)


def user_model() -> nn.Module:
    torch.manual_seed(0)
    return UserModel().eval()


def wider_model() -> nn.Module:
    """Same names as user_model, different widths: its weights do not fit user_model."""
    m = UserModel()
    m.mlp = MLP(16, 48)
    return m.eval()


def no_ffn() -> nn.Module:
    return nn.Sequential(nn.Embedding(16, 8), nn.LayerNorm(8)).eval()


def softmax_mlp() -> nn.Module:
    """Looks like an FFN, but a softmax is not an elementwise activation: a rejected candidate."""
    return nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 32), nn.Softmax(dim=-1), nn.Linear(32, 8)).eval()


def raises() -> nn.Module:
    raise RuntimeError("boom")


def not_a_module():
    return 42


def leftovers(directory):
    """Temporary files moeify left behind in `directory` (there must be none)."""
    return sorted(p.name for p in directory.iterdir() if ".moeify-tmp-" in p.name or ".moeify-old-" in p.name)
