# SPDX-License-Identifier: Apache-2.0
"""BayesianModule: the vectorized forward equals a loop over particles, for
every kind of layer; dropout randomness rules; priors and selection; shape
checks of the likelihoods; works with autoguides and distributed ELBOs."""

from __future__ import annotations

import re

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from torch import nn
from torch.func import functional_call

import pyro_sp
from pyro_sp.nn import BayesianModule, categorical_likelihood, last_layer, normal_likelihood

P = 4


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)  # restored by conftest
    torch.manual_seed(0)


class TinyViT(nn.Module):
    """Patch embedding, a transformer encoder layer and LayerNorm: the parts of a small ViT."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.encoder(h)).mean(1))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.attn(x, x, x, need_weights=False)[0])


NETWORKS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), (5, 6)),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)), (5, 3, 8, 8)),
    "attention": (Attention, (5, 7, 8)),
    "vit": (TinyViT, (5, 3, 16, 16)),
    "layernorm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 2)), (5, 6)),
    "batchnorm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), (5, 6)),
    "batchnorm2d": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 2)), (5, 3, 8, 8)),
}


def _sample_outputs(bnn, x, particles=P):
    with pyro.poutine.trace() as tr:
        with pyro.plate("num_particles_vectorized", particles, dim=-1):
            out = bnn(x)
    values = {n[len(bnn.name) + 1 :]: s["value"] for n, s in tr.trace.nodes.items() if s["type"] == "sample"}
    fixed = {n[len(bnn.name) + 1 :]: s["value"] for n, s in tr.trace.nodes.items() if s["type"] == "param"}
    return out, values, fixed


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_vectorized_forward_equals_loop(kind):
    make, shape = NETWORKS[kind]
    bnn = BayesianModule(make(), prior_scale="fan_in")
    x = torch.randn(shape)
    out, values, fixed = _sample_outputs(bnn, x)
    assert out.shape[0] == P
    buffers = dict(bnn.module.named_buffers())
    for p in range(P):
        params = {n: v[p] for n, v in values.items()}
        expected = functional_call(bnn.module, {**params, **fixed, **buffers}, (x,))
        torch.testing.assert_close(out[p], expected, rtol=1e-12, atol=1e-12)


def test_batchnorm_uses_batch_statistics():
    bnn = BayesianModule(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8)), bayesian="0")
    out, _, _ = _sample_outputs(bnn, torch.randn(32, 6))
    torch.testing.assert_close(out.mean(1), torch.zeros(P, 8), atol=1e-10, rtol=0)  # normalised per particle
    bnn.eval()
    out_eval, _, _ = _sample_outputs(bnn, torch.randn(32, 6))
    torch.testing.assert_close(out_eval.mean(1), torch.zeros(P, 8), atol=1e-10, rtol=0)


def test_dropout_randomness_rule():
    net = nn.Sequential(nn.Linear(6, 64), nn.Dropout(0.5), nn.Linear(64, 2))
    x = torch.randn(5, 6)
    for rule, same in (("different", False), ("same", True)):
        bnn = BayesianModule(net, bayesian="2", dropout=rule)  # identical first layer in every particle
        with pyro.poutine.trace() as tr, pyro.plate("num_particles_vectorized", P, dim=-1):
            bnn(x)
        # make every particle's random weights the same: outputs then differ only by dropout
        w = tr.trace.nodes["net.2.weight"]["value"][:1].expand(P, -1, -1)
        b = tr.trace.nodes["net.2.bias"]["value"][:1].expand(P, -1)
        cond = pyro.poutine.condition(bnn, data={"net.2.weight": w, "net.2.bias": b})
        with pyro.plate("num_particles_vectorized", P, dim=-1):
            out = cond(x)
        assert torch.equal(out[0], out[1]) == same, rule
    bnn.eval()
    with pyro.plate("num_particles_vectorized", P, dim=-1):
        out = pyro.poutine.condition(bnn, data={"net.2.weight": w, "net.2.bias": b})(x)
    assert torch.equal(out[0], out[1]), "eval mode must not drop units"


def test_selection_and_priors():
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    assert last_layer(net) == "2"
    bnn = BayesianModule(net, bayesian=last_layer(net), prior_scale={"2": "fan_in"})
    assert bnn.bayesian_names == ["2.weight", "2.bias"]
    assert bnn.deterministic_names == ["0.weight", "0.bias"]
    assert bnn.prior_scales == {"2.weight": pytest.approx(16**-0.5), "2.bias": 1.0}
    prior = bnn.prior("2.weight")
    assert prior.event_shape == (3, 16) and prior.base_dist.scale.max() == pytest.approx(0.25)
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    with pytest.raises(ValueError, match=re.escape(f"bayesian='7' selects none of {names}.")):
        BayesianModule(net, bayesian="7")
    with pytest.raises(ValueError, match=re.escape("Expected a prior scale for '0.weight' in ['2']; add its layer.")):
        BayesianModule(net, prior_scale={"2": 1.0})
    with pytest.raises(ValueError, match=r"Expected dropout in .*'different'.*'same'.*, got 'shared'\."):
        BayesianModule(net, dropout="shared")
    # deterministic parameters are pyro.params initialised from the module
    pyro.clear_param_store()
    BayesianModule(net, bayesian="2")(torch.randn(2, 6))
    assert torch.equal(pyro.param("net.0.weight").detach(), net[0].weight.detach())


def test_likelihood_shapes_are_checked():
    logits = torch.randn(P, 5, 3)
    y = torch.randint(0, 3, (5,))
    with pyro.plate("num_particles_vectorized", P, dim=-2):
        with pyro.poutine.trace() as tr:
            categorical_likelihood(logits, y, num_data=50)
        site = tr.trace.nodes["y"]
        assert site["fn"].batch_shape == (P, 5) and site["scale"] == 10.0
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"Expected logits of shape (particles={P}, batch=5, ...), got ({P}, 1, 5, 3): "
                "particles on the left, one batch dimension."
            ),
        ):
            categorical_likelihood(logits.unsqueeze(1), y)  # an extra dimension
        with pytest.raises(ValueError, match=re.escape("Expected labels of shape (5,), got (4,).")):
            categorical_likelihood(logits, y[:4])
    with pyro.plate("num_particles_vectorized", P, dim=-3):
        with pyro.poutine.trace() as tr:
            normal_likelihood(torch.randn(P, 5, 1), torch.randn(5), noise=0.3)
        assert tr.trace.nodes["y"]["fn"].batch_shape == (P, 1, 5)
    with pytest.raises(ValueError, match=re.escape("Expected noise to be a positive number or 'learned', got -1.0.")):
        normal_likelihood(torch.randn(5), torch.randn(5), noise=-1.0)


def _classifier(bnn):
    def model(x, y=None, num_data=None):
        return categorical_likelihood(bnn(x), y, num_data=num_data)

    return model


def _svi_and_predictive(elbo, predictive_cls, guide_cls, x, y):
    """Three SVI steps on a Bayesian classifier from a fixed seed, then the predictive probabilities."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    bnn = BayesianModule(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), prior_scale="fan_in")
    model = _classifier(bnn)
    guide = guide_cls(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=elbo)
    losses = [svi.step(x, y, 100) for _ in range(3)]
    probs = predictive_cls(model, guide=guide, num_samples=7, parallel=True, return_sites=("probs",))(x)["probs"]
    return losses, probs


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal])
@pytest.mark.parametrize(
    "elbo_cls,pyro_cls",
    [
        (pyro_sp.DistributedTrace_ELBO, pyro.infer.Trace_ELBO),
        (pyro_sp.DistributedTraceMeanField_ELBO, pyro.infer.TraceMeanField_ELBO),
    ],
)
def test_autoguides_and_elbos(guide_cls, elbo_cls, pyro_cls):
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    losses, probs = _svi_and_predictive(elbo_cls(num_particles=5), pyro_sp.DistributedPredictive, guide_cls, x, y)
    # in one process: Pyro's estimator and Pyro's Predictive, bit for bit
    expected_losses, expected_probs = _svi_and_predictive(pyro_cls(num_particles=5), pyro.infer.Predictive, guide_cls, x, y)
    assert losses == expected_losses
    assert probs.shape == (7, 10, 3) and torch.equal(probs, expected_probs)
    torch.testing.assert_close(probs.sum(-1), torch.ones(7, 10))


def _regression_loss_and_predictive(elbo, predictive_cls, sites):
    pyro.clear_param_store()
    torch.manual_seed(0)
    bnn = BayesianModule(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)))

    def model(x, y=None):
        return normal_likelihood(bnn(x), y)

    guide = AutoNormal(model)
    x = torch.randn(20, 2)
    y = x.sum(-1)
    loss = elbo.loss(model, guide, x, y)
    return loss, predictive_cls(model, guide=guide, num_samples=6, parallel=True, return_sites=sites)(x)


def test_regression_with_learned_noise():
    sites = ("mean", "sigma", "y")
    loss, out = _regression_loss_and_predictive(
        pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=3), pyro_sp.DistributedPredictive, sites
    )
    # in one process: Pyro's estimator and Pyro's Predictive, bit for bit
    expected_loss, expected = _regression_loss_and_predictive(
        pyro.infer.Trace_ELBO(vectorize_particles=True, num_particles=3), pyro.infer.Predictive, sites
    )
    assert loss == expected_loss
    assert out.keys() == expected.keys() == set(sites)
    for name in sites:
        assert torch.equal(out[name], expected[name]), name
    assert out["mean"].shape == (6, 20) and out["y"].shape == (6, 20)


def test_autoguide_starts_at_the_module_with_init_to_module():
    pyro.clear_param_store()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    bnn = BayesianModule(net, bayesian=["0", "3.weight"])  # the last bias stays deterministic

    def model(x, y=None):
        return categorical_likelihood(bnn(x), y)

    guide = AutoNormal(model, init_loc_fn=bnn.init_to_module)
    x, y = torch.randn(5, 1, 4, 4), torch.arange(5) % 3
    guide(x, y)
    median = guide.median()
    for name in bnn.bayesian_names:
        assert torch.equal(median[f"net.{name}"], dict(net.named_parameters())[name]), name
    pyro.clear_param_store()
    default = AutoNormal(model)  # Pyro's default start: zero for a Normal prior
    default(x, y)
    weight = default.median()["net.0.weight"]
    assert torch.equal(weight, torch.zeros_like(net[0].weight))
