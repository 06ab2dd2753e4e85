# SPDX-License-Identifier: Apache-2.0
"""The compiled estimators (``compile=``): with pinned particle noise they equal the
eager estimators (float64, <= 1e-10) in loss and gradients, on every interface, on
1, 2 and 3 ranks and a 2 x 2 grid; Pyro's RNG semantics hold; a program that is not
static runs eagerly with a warning; new shapes and parameters are captured anew."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample

import pyro_sp
from pyro_sp.infer.compiled import CompileFallbackWarning, _Program
from tests.common import assert_close, particle_seed, pinned_noise
from tests.models import make_guide
from tests.test_estimators import mixture_guide, mixture_model
from tests.test_exactness import _inputs

FAMILIES = {
    "trace": (pyro_sp.DistributedTrace_ELBO, Trace_ELBO),
    "meanfield": (pyro_sp.DistributedTraceMeanField_ELBO, TraceMeanField_ELBO),
    "enum": (pyro_sp.DistributedTraceEnum_ELBO, TraceEnum_ELBO),
}
KINDS = ("loss_and_grads", "loss", "differentiable_loss")


def _problem(family: str, guide_kind: str, data_index: int):
    if family == "enum":
        g = torch.Generator().manual_seed(30 + data_index)
        x = torch.cat([torch.randn(12, generator=g) - 1.0, torch.randn(12, generator=g) + 2.0])
        return mixture_model, mixture_guide, (x.to(torch.get_default_dtype()),), {}
    if guide_kind == "normal":  # randomly subsampled: a sample group draws its indices from its own stream
        model_fn, args, _ = _inputs(data_index, "full")
        kwargs = {"subsample_size": 8}
    else:
        model_fn, args, kwargs = _inputs(data_index, "none")
    return model_fn, make_guide(guide_kind, model_fn), args, kwargs


def _grads() -> dict:
    store = pyro.get_param_store()
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in store.named_parameters()}


def _zero_grads() -> None:
    for _, p in pyro.get_param_store().named_parameters():
        p.grad = None


def _call(elbo, kind, model_fn, guide, args, kwargs):
    _zero_grads()
    out = getattr(elbo, kind)(model_fn, guide, *args, **kwargs)
    if kind == "differentiable_loss":
        out.backward()
        out = out.item()
    return out, _grads(), torch.get_rng_state()


def compiled_case(family, guide_kind, num_particles, sample, data, backend, steps=4, kinds=KINDS):
    """Runs on every rank: the eager and the compiled estimator, call by call, same noise."""
    dist_cls, _ = FAMILIES[family]
    mesh = pyro_sp.SPMesh(sample=sample, data=data)
    model_fn, guide, args, kwargs = _problem(family, guide_kind, mesh.data_index)
    extra = {"max_plate_nesting": 1}  # no guess: every call sees the particle plate (and pinned noise)
    eager = dist_cls(num_particles=num_particles, mesh=mesh, vectorize_particles=True, **extra)
    compiled = dist_cls(num_particles=num_particles, mesh=mesh, vectorize_particles=True, compile=backend, **extra)
    lo, hi = mesh.particle_share(num_particles)
    rows = []
    with pinned_noise(num_particles, lo, hi):  # the noise is part of what is captured
        eager.loss(model_fn, guide, *args, **kwargs)  # creates and broadcasts the parameters
        for step in range(steps):  # eager, captured, compiled, compiled
            for kind in kinds:
                row = {}
                for name, elbo in (("eager", eager), ("compiled", compiled)):
                    torch.manual_seed(1000 * step + KINDS.index(kind))
                    with particle_seed(elbo, 7 + step + 100 * mesh.data_index):
                        row[name] = _call(elbo, kind, model_fn, guide, args, kwargs)
                rows.append((step, kind, row))
    programs = [p for p in compiled._compiled._programs.values() if isinstance(p, _Program)]
    return {"rows": rows, "captures": compiled._compiled.captures, "ran": sorted(p.kind for p in programs if p.ran)}


def _check(results, kinds=KINDS):
    for rank, r in enumerate(results):
        assert r["captures"] == len(kinds), f"rank {rank}: {r['captures']} graphs captured"
        assert r["ran"] == sorted(kinds), f"rank {rank}: compiled graphs ran for {r['ran']}"
        for step, kind, row in r["rows"]:
            (le, ge, rng_e), (lc, gc, rng_c) = row["eager"], row["compiled"]
            where = f"rank {rank} step {step} {kind}"
            assert_close(lc, le, msg=where)
            assert torch.equal(rng_c, rng_e), f"{where}: the global RNG state differs after the call"
            assert set(gc) == set(ge), where
            for n in ge:
                if kind == "loss":
                    continue
                assert (gc[n] is None) == (ge[n] is None), f"{where} {n}"
                if ge[n] is not None:
                    assert_close(gc[n], ge[n], msg=f"{where} grad {n}")
        # the reference gradients are real: some are non-zero
        assert any(g is not None and g.abs().sum() > 0 for g in r["rows"][-3][2]["eager"][1].values())


GRID = [
    pytest.param(1, 1, 5, id="w1"),
    pytest.param(2, 1, 7, id="w2-uneven"),
    pytest.param(3, 1, 7, id="w3-uneven"),
    pytest.param(2, 2, 5, id="hybrid2x2"),
]


_W1, _W2, _W3, _HYBRID = GRID
CASES = (
    # the autoguide with random subsampling on every grid; the other families where they differ
    [pytest.param("trace", "normal", *g.values, id=f"trace-normal-{g.id}") for g in GRID]
    + [pytest.param("trace", "param", *g.values, id=f"trace-param-{g.id}") for g in (_W1, _HYBRID)]
    + [pytest.param("meanfield", "normal", *g.values, id=f"meanfield-normal-{g.id}") for g in (_W3,)]
    + [pytest.param("enum", "param", *g.values, id=f"enum-param-{g.id}") for g in (_W2, _HYBRID)]
)


@pytest.mark.parametrize("family,guide_kind,sample,data,num_particles", CASES)
def test_compiled_equals_eager_distributed(pools, family, guide_kind, sample, data, num_particles):
    torch.set_default_dtype(torch.float64)
    results = pools(sample * data).run(compiled_case, family, guide_kind, num_particles, sample, data, "graph")
    _check(results)


def test_compiled_inductor_distributed(pools):
    results = pools(2).run(compiled_case, "trace", "normal", 5, 2, 1, True, 3, ("loss_and_grads",))
    _check(results, ("loss_and_grads",))


def test_compiled_equals_eager_one_process():
    torch.set_default_dtype(torch.float64)
    _check([compiled_case("trace", "normal", 4, 1, 1, "aot_eager")])  # torch.compile, no process group


# ---- against Pyro itself, with inductor, in one process ------------------------------
class _Regression(PyroModule):
    def __init__(self):
        super().__init__()
        self.linear = PyroModule[torch.nn.Linear](3, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 3]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def forward(self, x, y):
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)


class _VAE(torch.nn.Module):
    """Pyro's VAE tutorial in small: modules registered with ``pyro.module``."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Softplus(), torch.nn.Linear(6, 4))
        self.decoder = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Softplus(), torch.nn.Linear(6, 8))

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            h = self.encoder(x)
            pyro.sample("z", dist.Normal(h[..., :2], torch.nn.functional.softplus(h[..., 2:])).to_event(1))


def _svi_run(make, loss, steps, args):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model_fn, guide = make()
    svi = SVI(model_fn, guide, pyro.optim.Adam({"lr": 0.02}), loss=loss)
    losses = [svi.step(*args) for _ in range(steps)]
    params = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
    return losses, params, torch.get_rng_state()


def _regression():
    m = _Regression()
    return m, AutoNormal(m)


def _vae():
    torch.manual_seed(3)
    v = _VAE().double()
    return v.model, v.guide


def _mixture():
    return mixture_model, mixture_guide


@pytest.mark.parametrize("name,backend", [("pyromodule", "graph"), ("vae", True), ("enum", True)])
def test_compiled_svi_equals_pyro(name, backend):
    """SVI with compile=True (inductor) takes Pyro's steps: losses, parameters, RNG."""
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(1)
    if name == "pyromodule":
        x = torch.randn(20, 3, generator=g)
        make, args, pyro_cls, ours = _regression, (x, x.sum(-1)), Trace_ELBO, pyro_sp.DistributedTrace_ELBO
        kw = {"num_particles": 2}  # Pyro's sequential particles: both unrolled in one graph
    elif name == "vae":
        make, args = _vae, ((torch.rand(16, 8, generator=g) > 0.5).double(),)
        pyro_cls, ours, kw = TraceMeanField_ELBO, pyro_sp.DistributedTraceMeanField_ELBO, {}
    else:
        x = torch.cat([torch.randn(10, generator=g) - 1.0, torch.randn(10, generator=g) + 2.0])
        make, args, pyro_cls, ours = _mixture, (x,), TraceEnum_ELBO, pyro_sp.DistributedTraceEnum_ELBO
        kw = {"max_plate_nesting": 1}
    ref = _svi_run(make, pyro_cls(**kw), 6, args)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        elbo = ours(compile=backend, **kw)
        got = _svi_run(make, elbo, 6, args)
    assert elbo._compiled.captures == 1
    for a, b in zip(got[0], ref[0]):
        assert_close(a, b, msg=f"{name} loss")
    assert set(got[1]) == set(ref[1])
    for n in ref[1]:
        assert_close(got[1][n], ref[1][n], msg=f"{name} {n}")
    assert torch.equal(got[2], ref[2]), "the global RNG state after training differs from Pyro's"


def test_compiled_bayesian_module():
    """The BayesianModule path, which Pyro's JitTrace_ELBO cannot trace, compiles and is exact."""
    from pyro_sp.nn import BayesianModule, categorical_likelihood

    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).double()
    bnn = BayesianModule(net)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))

    def make():
        def model(x, y):
            return categorical_likelihood(bnn(x), y)

        return model, AutoNormal(model, init_scale=0.05)

    kw = {"num_particles": 4, "vectorize_particles": True}
    ref = _svi_run(make, Trace_ELBO(**kw), 5, (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        got = _svi_run(make, pyro_sp.DistributedTrace_ELBO(compile="graph", **kw), 5, (x, y))
    for a, b in zip(got[0], ref[0]):
        assert_close(a, b)
    for n in ref[1]:
        assert_close(got[1][n], ref[1][n], msg=n)


# ---- keys: new shapes, new parameters -----------------------------------------------------
def _linear_model(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w.unsqueeze(-2)).sum(-1), 1.0), obs=y)


def test_new_shape_and_new_parameters_are_captured_anew():
    torch.set_default_dtype(torch.float64)
    guide = AutoNormal(_linear_model)
    kw = {"num_particles": 3, "vectorize_particles": True, "max_plate_nesting": 1}
    elbo = pyro_sp.DistributedTrace_ELBO(compile="aot_eager", **kw)
    ref = Trace_ELBO(**kw)
    ref.loss(_linear_model, guide, torch.randn(10, 3), torch.randn(10))  # creates the parameters
    for n in (10, 10, 10, 10, 7, 7, 7, 10):
        x, y = torch.randn(n, 3), torch.randn(n)
        state = torch.get_rng_state()
        got = elbo.loss(_linear_model, guide, x, y)
        torch.set_rng_state(state)
        assert_close(got, ref.loss(_linear_model, guide, x, y), msg=f"batch {n}")
    assert elbo._compiled.captures == 2  # one per batch size
    # a replaced parameter: a new key, run eagerly, then captured again
    store = pyro.get_param_store()
    name = next(iter(store.keys()))
    store[name] = store[name].detach() + 0.5
    x, y = torch.randn(10, 3), torch.randn(10)
    for _ in range(3):
        state = torch.get_rng_state()
        got = elbo.loss(_linear_model, guide, x, y)
        torch.set_rng_state(state)
        assert_close(got, ref.loss(_linear_model, guide, x, y))
    assert elbo._compiled.captures == 3


# ---- programs that are not static ------------------------------------------------------------
def _reads_value(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    scale = 2.0 if w[..., 0].sum() > 0 else 1.0  # a branch on a sampled value
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w.unsqueeze(-2)).sum(-1), scale), obs=y)


def _dynamic_shape(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    keep = torch.nonzero(y > 0).squeeze(-1)
    with pyro.plate("data", keep.shape[0]):
        pyro.sample("y", dist.Normal((x[keep] * w.unsqueeze(-2)).sum(-1), 1.0), obs=y[keep])


_FREE = torch.tensor(0.3, requires_grad=True)


def _free_leaf(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x * w.unsqueeze(-2)).sum(-1) + _FREE, 1.0), obs=y)


@pytest.mark.parametrize("model_fn,args,message,captures", [
    (_reads_value, (), r"the value it reads at .*test_compiled\.py:\d+ \(_reads_value\).* changed in 3 calls", 1),
    (_dynamic_shape, (), r"nonzero.* at .*test_compiled\.py:\d+ \(_dynamic_shape.*depends on values", 0),
    (_free_leaf, (), r"depends on 1 tensor\(s\) that require grad but are neither Pyro parameters", 0),
    (_linear_model, ({"a set"},), r"Argument leaf 2 is a set, which is neither a tensor nor hashable", 0),
], ids=["value-read", "dynamic-shape", "free-leaf", "unhashable-arg"])
def test_not_static_runs_eagerly_with_a_warning(model_fn, args, message, captures):
    """Never silently wrong: every call equals Pyro's, and the warning names the place."""
    torch.set_default_dtype(torch.float64)

    def model(x, y, *rest):
        return model_fn(x, y)

    guide = AutoNormal(model)
    kw = {"num_particles": 3, "vectorize_particles": True, "max_plate_nesting": 1}
    elbo = pyro_sp.DistributedTrace_ELBO(compile="aot_eager", **kw)
    ref = Trace_ELBO(**kw)
    x, y = torch.randn(10, 3), torch.randn(10)
    ref.loss(model, guide, x, y, *args)  # creates the parameters
    with pytest.warns(CompileFallbackWarning, match=message):
        for _ in range(20):
            _zero_grads()
            state = torch.get_rng_state()
            got = elbo.loss_and_grads(model, guide, x, y, *args)
            got_grads = _grads()
            torch.set_rng_state(state)
            _zero_grads()
            assert_close(got, ref.loss_and_grads(model, guide, x, y, *args))
            for n, g in _grads().items():
                assert_close(got_grads[n], g, msg=n)
    assert elbo._compiled.captures == captures


def test_compile_argument_errors():
    with pytest.raises(TypeError, match=r"Expected compile=False for DistributedRenyiELBO: compile= is offered by"):
        pyro_sp.DistributedRenyiELBO(compile=True)
    with pytest.raises(TypeError, match=r"Expected compile=False for DistributedJitTrace_ELBO"):
        pyro_sp.DistributedJitTrace_ELBO(compile=True)
    with pytest.raises(ValueError, match=r"Expected cuda_graphs=True together with compile=True"):
        pyro_sp.DistributedTrace_ELBO(cuda_graphs=True)
    with pytest.raises(ValueError, match=r"Expected the inductor backend with cuda_graphs=True"):
        pyro_sp.DistributedTrace_ELBO(compile="aot_eager", cuda_graphs=True)
    with pytest.raises(TypeError, match=r"Expected compile=True, False or a torch.compile backend name, got 3"):
        pyro_sp.DistributedTrace_ELBO(compile=3)
