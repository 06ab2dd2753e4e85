# SPDX-License-Identifier: Apache-2.0
"""A drop-in keeps Pyro's promises beyond the value: random-number semantics
(``pyro.set_rng_seed``), lazily initialised parameters, exception types,
default arguments, data agreement across a sample group, and edge cases."""

from __future__ import annotations

import inspect
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as tdist
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    TraceTailAdaptive_ELBO,
    TraceTMC_ELBO,
)
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal

import pyro_sp
from tests.common import assert_close, particle_seed, pinned_noise
from tests.models import make_data, model, model_noplate, param_guide

PAIRS = {
    "Trace_ELBO": (pyro_sp.DistributedTrace_ELBO, Trace_ELBO),
    "JitTrace_ELBO": (pyro_sp.DistributedJitTrace_ELBO, JitTrace_ELBO),
    "TraceMeanField_ELBO": (pyro_sp.DistributedTraceMeanField_ELBO, TraceMeanField_ELBO),
    "JitTraceMeanField_ELBO": (pyro_sp.DistributedJitTraceMeanField_ELBO, JitTraceMeanField_ELBO),
    "TraceGraph_ELBO": (pyro_sp.DistributedTraceGraph_ELBO, TraceGraph_ELBO),
    "JitTraceGraph_ELBO": (pyro_sp.DistributedJitTraceGraph_ELBO, JitTraceGraph_ELBO),
    "TraceEnum_ELBO": (pyro_sp.DistributedTraceEnum_ELBO, TraceEnum_ELBO),
    "JitTraceEnum_ELBO": (pyro_sp.DistributedJitTraceEnum_ELBO, JitTraceEnum_ELBO),
    "TraceTMC_ELBO": (pyro_sp.DistributedTraceTMC_ELBO, TraceTMC_ELBO),
    "RenyiELBO": (pyro_sp.DistributedRenyiELBO, RenyiELBO),
    "TraceTailAdaptive_ELBO": (pyro_sp.DistributedTraceTailAdaptive_ELBO, TraceTailAdaptive_ELBO),
}


# ---- 1. random numbers: Pyro's semantics at every world size ------------------------
def _grads():
    return {n: p.grad.clone() for n, p in pyro.get_param_store().named_parameters() if p.grad is not None}


def _zero():
    for _, p in pyro.get_param_store().named_parameters():
        p.grad = None


def reseeding(vectorize: bool):
    """Re-seeding reproduces a call, on all three interfaces; calls and estimators draw fresh noise."""
    x, y = make_data(3)
    mesh = pyro_sp.SPMesh(sample=tdist.get_world_size())
    elbo = pyro_sp.DistributedTrace_ELBO(num_particles=5, vectorize_particles=vectorize, max_plate_nesting=1, mesh=mesh)
    guide = AutoNormal(model_noplate, init_scale=0.3)
    pyro.set_rng_seed(1)
    elbo.loss(model_noplate, guide, x, y)  # creates the parameters
    out = {}
    pyro.set_rng_seed(7)
    out["loss"] = elbo.loss(model_noplate, guide, x, y)
    out["loss_next"] = elbo.loss(model_noplate, guide, x, y)  # no re-seed: fresh noise
    pyro.set_rng_seed(7)
    out["loss_again"] = elbo.loss(model_noplate, guide, x, y)
    _zero()
    pyro.set_rng_seed(7)
    out["loss_and_grads"] = elbo.loss_and_grads(model_noplate, guide, x, y)
    out["grads_lg"] = _grads()
    _zero()
    pyro.set_rng_seed(7)
    out["loss_and_grads_again"] = elbo.loss_and_grads(model_noplate, guide, x, y)
    out["grads_lg_again"] = _grads()
    _zero()
    pyro.set_rng_seed(7)
    surrogate = elbo.differentiable_loss(model_noplate, guide, x, y)
    surrogate.backward()
    out["differentiable_loss"] = surrogate.item()
    out["grads_dl"] = _grads()
    # (as in Pyro, a new estimator replays an old one's call only when it need not
    # guess max_plate_nesting: the guess runs the model on the global RNG)
    pyro.set_rng_seed(7)
    fresh = pyro_sp.DistributedTrace_ELBO(num_particles=5, vectorize_particles=vectorize, max_plate_nesting=1, mesh=mesh)
    out["new_estimator_same_seed"] = fresh.loss(model_noplate, guide, x, y)
    # two estimators built one after the other draw different noise (no replay)
    out["another_estimator"] = pyro_sp.DistributedTrace_ELBO(
        num_particles=5, vectorize_particles=vectorize, max_plate_nesting=1, mesh=mesh
    ).loss(model_noplate, guide, x, y)
    out["yet_another_estimator"] = pyro_sp.DistributedTrace_ELBO(
        num_particles=5, vectorize_particles=vectorize, max_plate_nesting=1, mesh=mesh
    ).loss(model_noplate, guide, x, y)
    return out


@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "sequential"])
@pytest.mark.parametrize("world", [2, 3])
def test_set_rng_seed_reproduces_every_interface(pools, world, vectorize):
    results = pools(world).run(reseeding, vectorize)
    for r in results:
        for k in r:  # the global estimate: the same on every rank
            if not k.startswith("grads"):
                assert r[k] == results[0][k], k
        assert r["loss"] == r["loss_again"] == r["new_estimator_same_seed"]
        assert r["loss_and_grads"] == r["loss_and_grads_again"]
        # the interfaces sum in different orders (float32 here), as Pyro's do
        assert_close(r["loss_and_grads"], r["loss"], rtol=1e-6)
        assert_close(r["differentiable_loss"], r["loss"], rtol=1e-6)
        assert r["loss_next"] != r["loss"]
        assert r["another_estimator"] != r["yet_another_estimator"]
        assert r["grads_lg"].keys() == r["grads_dl"].keys() and r["grads_lg"]
        for n, g in r["grads_lg"].items():
            assert torch.equal(r["grads_lg_again"][n], g), n
            assert_close(r["grads_dl"][n], g, rtol=1e-5, atol=1e-6, msg=n)
            assert torch.equal(g, results[0]["grads_lg"][n]), n


def _lazy_guides():
    def init_random(site):  # random restarts, as in Pyro's GMM tutorial
        unconstrained = torch.randn(site["fn"].shape()) * 2.0
        return torch.distributions.biject_to(site["fn"].support)(unconstrained)

    return {
        "diag": lambda: AutoDiagonalNormal(model_noplate, init_scale=0.3),  # init_to_median: random
        "delta": lambda: AutoDelta(model_noplate, init_loc_fn=init_random),
    }


def lazy_initialisation(kind: str, seeds: tuple, vectorize: bool):
    """Parameters created inside the first distributed call: Pyro's values from the user's RNG."""
    x, y = make_data(4)
    values = []
    for seed in seeds:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = _lazy_guides()[kind]()
        elbo = pyro_sp.DistributedTrace_ELBO(num_particles=4, vectorize_particles=vectorize)
        elbo.loss(model_noplate, guide, x, y)
        values.append({n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()})
    return values


def _pyro_initial_values(kind: str, seed: int, vectorize: bool):
    x, y = make_data(4)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = _lazy_guides()[kind]()
    Trace_ELBO(num_particles=4, vectorize_particles=vectorize).loss(model_noplate, guide, x, y)
    return {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}


@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "sequential"])
@pytest.mark.parametrize("kind", ["diag", "delta"])
def test_lazy_parameters_start_where_pyro_starts(pools, kind, vectorize):
    seeds = (0, 1)
    results = pools(2).run(lazy_initialisation, kind, seeds, vectorize)
    torch.set_default_dtype(torch.float64)
    for i, seed in enumerate(seeds):
        expected = _pyro_initial_values(kind, seed, vectorize)
        for rank, values in enumerate(results):
            assert values[i].keys() == expected.keys()
            for n in expected:
                assert torch.equal(values[i][n], expected[n]), (rank, seed, n)
    first = results[0]
    assert any(not torch.equal(first[0][n], first[1][n]) for n in first[0]), "seeds gave the same start"


def disagreeing_rng():
    x, y = make_data(0)
    torch.manual_seed(tdist.get_rank())  # a rank-dependent seed, as some scripts do
    elbo = pyro_sp.DistributedTrace_ELBO(num_particles=4, vectorize_particles=True)
    elbo.loss(model, param_guide, x, y)


def test_ranks_with_different_rng_states_are_refused(pools):
    errors = pools(2).run_expecting_errors(disagreeing_rng)
    keys = set()
    for kind, msg, _ in errors.values():
        assert kind == "ValueError"
        lines = msg.splitlines()
        assert lines[0].startswith("Expected the ranks of each sample group to call DistributedTrace_ELBO.loss with the same data and the same random state"), msg
        # only the random key differs (the data agree), and each rank's key is printed
        (line,) = lines[1:-1]
        match = re.fullmatch(r"  data group 0: random key of the call \(drawn from the global torch RNG\): rank 0 has (\d+), rank 1 has (\d+)", line)
        assert match and match[1] != match[2], line
        keys.add(match.groups())
        assert "seed the global RNG identically on those ranks (pyro.set_rng_seed(s) with the same s" in lines[-1]
    assert len(keys) == 1, "the ranks printed different keys"


def data_groups_may_differ_in_rng():
    """Across data groups, RNG states (and data) may differ: only a sample group must agree."""
    mesh = pyro_sp.SPMesh(sample=1, data=2)
    x, y = make_data(mesh.data_index)
    pyro.set_rng_seed(10 + mesh.data_index)
    elbo = pyro_sp.DistributedTrace_ELBO(num_particles=4, vectorize_particles=True, mesh=mesh)
    return elbo.loss(model, param_guide, x, y)


def test_data_groups_may_differ(pools):
    losses = pools(2).run(data_groups_may_differ_in_rng)
    assert losses[0] == losses[1]


# ---- 2. exceptions keep their type ----------------------------------------------------
def _bad_scale_model(x, y):
    pyro.sample("w", dist.Normal(0.0, -1.0))  # a ValueError from Pyro's validation


def _not_reparameterized_guide(x):
    p = pyro.param("p", torch.tensor(0.4), constraint=dist.constraints.unit_interval)
    pyro.sample("c", dist.Bernoulli(p))


def _bernoulli_model(x):
    pyro.sample("c", dist.Bernoulli(0.3))


def _shape_error_model(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(torch.mv(x, w), 1.0), obs=y)  # mv fails on a particle dim


def raising(case: str):
    x, y = make_data(0)
    if case == "NotImplementedError":
        elbo = pyro_sp.DistributedTraceTailAdaptive_ELBO(num_particles=4, vectorize_particles=True)
        elbo.loss_and_grads(_bernoulli_model, _not_reparameterized_guide, x)
    elif case == "ValueError":
        pyro_sp.DistributedTrace_ELBO(num_particles=4).loss(_bad_scale_model, param_guide, x, y)
    elif case == "shape":
        pyro_sp.DistributedTrace_ELBO(num_particles=4, vectorize_particles=True).loss(
            _shape_error_model, param_guide, x, y
        )
    elif case == "one_rank":
        if tdist.get_rank() == 1:
            raise_on = ValueError("only on rank 1")
        else:
            raise_on = None

        def guide(x, y):
            if raise_on is not None:
                raise raise_on
            param_guide(x, y)

        pyro_sp.DistributedTrace_ELBO(num_particles=4).loss(model, guide, x, y)
    return "no error"


def _pyro_raises(case: str) -> tuple[str, str]:
    """Type and first message line of what Pyro's own estimator raises in ``raising(case)``."""
    x, y = make_data(0)
    pyro.clear_param_store()
    try:
        if case == "NotImplementedError":
            TraceTailAdaptive_ELBO(num_particles=4, vectorize_particles=True).loss_and_grads(
                _bernoulli_model, _not_reparameterized_guide, x
            )
        elif case == "ValueError":
            Trace_ELBO(num_particles=4).loss(_bad_scale_model, param_guide, x, y)
        else:
            Trace_ELBO(num_particles=4, vectorize_particles=True).loss(_shape_error_model, param_guide, x, y)
    except Exception as e:  # noqa: BLE001 - the reference error
        return type(e).__name__, str(e).splitlines()[0]
    raise AssertionError(f"Pyro raised nothing in case {case}")


@pytest.mark.parametrize(
    "case,expected",
    [
        ("NotImplementedError", "NotImplementedError"),
        ("ValueError", "ValueError"),
        ("shape", "RuntimeError"),
    ],
)
def test_every_rank_raises_the_original_type(pools, case, expected):
    torch.set_default_dtype(torch.float64)  # as on the ranks
    reference = _pyro_raises(case)
    assert reference[0] == expected
    errors = pools(2).run_expecting_errors(raising, case)
    for rank, (kind, msg, tb) in errors.items():
        # Pyro's (or torch's) own error: its type and message
        assert (kind, msg.splitlines()[0]) == reference, (rank, kind, msg)
        assert f"[pyro_sp] raised on rank {rank} in DistributedTrace" in tb  # the note; the original traceback comes first
    assert pools(2).run(raising, "none") == ["no error"] * 2, "ranks not usable after the error"


def test_one_failing_rank_keeps_its_type_and_names_itself_on_the_others(pools):
    errors = pools(2).run_expecting_errors(raising, "one_rank")
    kind, msg, _ = errors[1]
    assert (kind, msg.splitlines()[0]) == ("ValueError", "only on rank 1")  # then Pyro's trace shapes
    assert errors[0][0] == "RankError"
    assert errors[0][1].startswith(f"DistributedTrace_ELBO.loss failed on 1 of 2 ranks (rank 1: ValueError: {msg})."), errors[0][1]


def caught_by_type():
    """A user's ``except ValueError`` works as with Pyro, and training can go on."""
    x, y = make_data(0)
    elbo = pyro_sp.DistributedTrace_ELBO(num_particles=4)
    try:
        elbo.loss(_bad_scale_model, param_guide, x, y)
    except ValueError:
        caught = True
    else:
        caught = False
    return caught, elbo.loss(model, param_guide, x, y)


def test_caught_by_type(pools):
    results = pools(2).run(caught_by_type)
    assert results[0][0] and results[1][0] and results[0][1] == results[1][1]


# ---- 3. defaults and data agreement --------------------------------------------------------
def _attributes(elbo) -> dict:
    return {k: v for k, v in vars(elbo).items() if not k.startswith("_") and k != "mesh"}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_defaults_are_pyros(name):
    ours, theirs = PAIRS[name]
    mine, reference = _attributes(ours()), _attributes(theirs())
    assert set(reference) <= set(mine)
    for key, value in reference.items():
        assert mine[key] == value or (value != value and mine[key] != mine[key]), (key, mine[key], value)
    # the keywords of Pyro's constructor are accepted
    accepted = inspect.signature(theirs.__init__).parameters
    explicit = {k: v for k, v in reference.items() if k in accepted and k != "max_plate_nesting"}
    mine_explicit = _attributes(ours(**explicit))
    for key, value in explicit.items():
        assert mine_explicit[key] == value, key


def test_default_construction_is_bit_identical_in_one_process():
    assert not tdist.is_initialized()
    x, y = make_data(0)
    runs = []
    for loss in (pyro_sp.DistributedTrace_ELBO(), Trace_ELBO()):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        guide = AutoNormal(model, init_scale=0.3)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
        losses = [svi.step(x, y) for _ in range(4)]
        runs.append((losses, {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}))
    assert runs[0][0] == runs[1][0]
    for n in runs[1][1]:
        assert torch.equal(runs[0][1][n], runs[1][1][n]), n


def _unvectorizable_model(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(torch.mv(x, w) + b, 0.5), obs=y)


def literal_swap_trains_an_unvectorizable_model():
    """``DistributedTrace_ELBO(num_particles=16)`` takes Pyro's default: sequential particles."""
    x, y = make_data(1)
    pyro.set_rng_seed(0)
    guide = AutoNormal(_unvectorizable_model)
    svi = SVI(_unvectorizable_model, guide, pyro.optim.Adam({"lr": 0.05}),
              loss=pyro_sp.DistributedTrace_ELBO(num_particles=16))
    losses = [svi.step(x, y) for _ in range(3)]
    return losses, pyro.param("AutoNormal.locs.w").detach().clone()


def test_literal_swap_trains_an_unvectorizable_model(pools):
    (l0, w0), (l1, w1) = pools(2).run(literal_swap_trains_an_unvectorizable_model)
    assert l0 == l1 and torch.equal(w0, w1)


def mismatched_data(case: str):
    rank = tdist.get_rank()
    if case == "rows":
        x, y = make_data(0, n=40 if rank == 0 else 30)
    elif case == "values":
        x, y = make_data(rank)  # unseeded-looking data: different on each rank
    else:
        x, y = make_data(0)
        y = y.clone()
        y[-1] += 1e-12 * rank  # one element, one ulp-sized change
    elbo = pyro_sp.DistributedTrace_ELBO(num_particles=4, vectorize_particles=True)
    elbo.loss(model, param_guide, x, y)


#: case -> (path, shape on rank 0, shape on rank 1) of every argument named as differing
DIFFERING = {
    "rows": [("args[0]", (40, 3), (30, 3)), ("args[1]", (40,), (30,))],
    "values": [("args[0]", (24, 3), (24, 3)), ("args[1]", (24,), (24,))],
    "one_value": [("args[1]", (24,), (24,))],  # x agrees: not named
}


@pytest.mark.parametrize("case", sorted(DIFFERING))
def test_sample_group_data_must_agree(pools, case):
    for kind, msg, _ in pools(2).run_expecting_errors(mismatched_data, case).values():
        assert kind == "ValueError"
        lines = msg.splitlines()
        assert "call DistributedTrace_ELBO.loss with the same data" in lines[0], msg
        assert lines[-1].startswith("Give every rank of a sample group the same arguments"), msg
        named = [
            re.fullmatch(r"  data group 0: (\S+): rank 0 has \((\(.*?\)), 'torch.float64', (\d+)\), rank 1 has \((\(.*?\)), 'torch.float64', (\d+)\)", line)
            for line in lines[1:-1]
        ]
        assert all(named), lines[1:-1]
        assert [(m[1], eval(m[2]), eval(m[4])) for m in named] == DIFFERING[case]
        assert all(m[3] != m[5] for m in named), "the value hashes of differing data are equal"
    assert pools(2).run(raising, "none") == ["no error"] * 2


def augmented_per_rank():
    """Independently augmented minibatches are meant to differ: only shapes and dtypes agree."""
    x, y = make_data(0)
    noisy = pyro_sp.rank_local(x + 0.01 * tdist.get_rank())
    elbo = pyro_sp.DistributedTrace_ELBO(num_particles=4, vectorize_particles=True)
    loss = elbo.loss(model, param_guide, noisy, y)
    try:
        elbo.loss(model, param_guide, pyro_sp.rank_local(x[: 20 + tdist.get_rank()]), y[: 20 + tdist.get_rank()])
    except ValueError as e:
        return loss, str(e)
    return loss, None


def test_rank_local_data_skips_the_value_check_only(pools):
    (l0, e0), (l1, e1) = pools(2).run(augmented_per_rank)
    assert l0 == l1
    assert e0 is not None and e0 == e1
    # the rank-local x is compared by shape (and named as rank-local); y by its values too
    assert (
        "  data group 0: args[0]: rank 0 has ('tensor', (20, 3), 'torch.float64', 'rank-local'), "
        "rank 1 has ('tensor', (21, 3), 'torch.float64', 'rank-local')"
    ) in e0.splitlines(), e0
    assert "  data group 0: args[1]: rank 0 has ((20,), 'torch.float64', " in e0, e0


# ---- what Pyro's own tests rely on (found by benchmarks/pyro_conformance.py) -------------
def _scaled_model(scale_t):
    def scaled(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        sigma = pyro.sample("sigma", dist.LogNormal(-1.0, 0.5))
        mean = (x * w.unsqueeze(-2)).sum(-1) + b.unsqueeze(-1)
        pyro.sample("obs", dist.Normal(mean, sigma.unsqueeze(-1) * scale_t).to_event(1), obs=y)

    return scaled


def autograd_grad_of_differentiable_loss(distributed: bool):
    """``torch.autograd.grad`` of ``differentiable_loss``, by a parameter and by a closed-over leaf."""
    x, y = make_data(5)
    scale_t = torch.tensor(1.3, requires_grad=True)  # not a pyro.param: closed over by the model
    scaled = _scaled_model(scale_t)
    cls = pyro_sp.DistributedTrace_ELBO if distributed else Trace_ELBO
    elbo = cls(num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    elbo.loss(scaled, param_guide, x, y)  # creates (and synchronises) the parameters
    w_loc = pyro.param("w_loc").unconstrained()
    mesh = getattr(elbo, "mesh", pyro_sp.default_mesh())
    lo, hi = mesh.particle_share(5) if distributed else (0, 5)
    with pinned_noise(5, lo, hi), particle_seed(elbo, 4):
        loss = elbo.differentiable_loss(scaled, param_guide, x, y)
    by_grad = torch.autograd.grad(loss, [w_loc, scale_t])
    w_loc.grad = None
    with pinned_noise(5, lo, hi), particle_seed(elbo, 4):
        elbo.differentiable_loss(scaled, param_guide, x, y).backward()
    return loss.item(), by_grad, (w_loc.grad.clone(), scale_t.grad.clone())


@pytest.mark.parametrize("world", [2, 3])
def test_autograd_grad_of_differentiable_loss_is_the_global_gradient(pools, world):
    torch.set_default_dtype(torch.float64)
    loss, (g_w, g_s), _ = autograd_grad_of_differentiable_loss(False)
    for mine, (m_w, m_s), (b_w, b_s) in pools(world).run(autograd_grad_of_differentiable_loss, True):
        assert_close(mine, loss)
        assert_close(m_w, g_w)
        assert_close(m_s, g_s)  # a leaf that is no parameter: reduced too
        assert_close(b_w, g_w)  # .backward() gives the same, with no collective of its own
        assert_close(b_s, g_s)


def one_particle_is_pyros(seed: int, distributed: bool):
    """Rank 0 draws from the user's RNG at entry: with one particle, the call is Pyro's, bit for bit."""
    x, y = make_data(6)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoNormal(model_noplate, init_loc_fn=pyro.infer.autoguide.init_to_sample)  # random init
    cls = pyro_sp.DistributedTrace_ELBO if distributed else Trace_ELBO
    elbo = cls(max_plate_nesting=1)  # Pyro's default: one particle
    loss = elbo.loss_and_grads(model_noplate, guide, x, y)
    return loss, {n: (p.detach().clone(), p.grad.clone()) for n, p in pyro.get_param_store().named_parameters()}


def test_one_particle_at_two_ranks_reproduces_pyro_bit_for_bit(pools):
    torch.set_default_dtype(torch.float64)
    for seed in (0, 1):
        loss, expected = one_particle_is_pyros(seed, False)
        for mine, values in pools(2).run(one_particle_is_pyros, seed, True):
            assert mine == loss, seed
            assert values.keys() == expected.keys()
            for n, (value, grad) in expected.items():
                assert torch.equal(values[n][0], value), (seed, n)
                assert torch.equal(values[n][1], grad), (seed, n)


def graph_built_before_the_first_call():
    """A graph built from a parameter before the first call stays usable (no version bump)."""
    x, y = make_data(0)
    pyro.clear_param_store()
    w_loc = pyro.param("w_loc", torch.tensor([0.3, -0.2, 0.1]))
    penalty = (w_loc**2).sum()  # saves w_loc for backward
    calls = []

    def counting_model(x, y):
        calls.append(1)
        return model(x, y)

    elbo = pyro_sp.DistributedTrace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    elbo.loss_and_grads(counting_model, param_guide, x, y)  # broadcasts the new parameters
    (g,) = torch.autograd.grad(penalty, [pyro.param("w_loc").unconstrained()])
    return len(calls), g


def test_graph_built_before_the_first_call_survives_and_rank_0_runs_once(pools):
    results = pools(3).run(graph_built_before_the_first_call)
    for rank, (calls, g) in enumerate(results):
        assert_close(g, 2 * torch.tensor([0.3, -0.2, 0.1], dtype=g.dtype))
        # rank 0 is the broadcast's source: its run stands; the others run again
        assert calls == (1 if rank == 0 else 2), (rank, calls)


# ---- 4. edge cases Pyro accepts ------------------------------------------------------------
def _empty(*args, **kwargs):
    pass


def _fixed_guide(x, y):
    """A guide with no trainable parameter."""
    pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("b", dist.Normal(0.0, 1.0))
    pyro.sample("sigma", dist.LogNormal(-1.0, 0.5))


def edge_values(distributed: bool):
    x, y = make_data(2)
    cls = pyro_sp.DistributedTrace_ELBO if distributed else Trace_ELBO
    elbo = cls(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    out = {
        "empty_loss": elbo.loss(_empty, _empty),
        "empty_loss_and_grads": elbo.loss_and_grads(_empty, _empty),
        "empty_differentiable_loss": elbo.differentiable_loss(_empty, _empty),
    }
    graph = (pyro_sp.DistributedTraceGraph_ELBO if distributed else TraceGraph_ELBO)(num_particles=4)
    out["empty_tracegraph_loss"] = graph.loss(_empty, _empty)
    out["empty_tracegraph_loss_and_grads"] = graph.loss_and_grads(_empty, _empty)
    if distributed:  # Pyro's TraceGraph_ELBO has no differentiable_loss; pyro_sp's returns Pyro's float
        out["empty_tracegraph_differentiable_loss"] = graph.differentiable_loss(_empty, _empty)
    elbo.loss(model, _fixed_guide, x, y)
    mesh = getattr(elbo, "mesh", pyro_sp.default_mesh())
    lo, hi = mesh.particle_share(4)
    with pinned_noise(4, lo, hi), particle_seed(elbo, 9):
        out["no_params_loss"] = elbo.loss(model, _fixed_guide, x, y)
    with pinned_noise(4, lo, hi), particle_seed(elbo, 9):
        out["no_params_differentiable_loss"] = elbo.differentiable_loss(model, _fixed_guide, x, y)
    return out


def test_edge_cases_match_pyro(pools):
    torch.set_default_dtype(torch.float64)  # as on the ranks
    reference = edge_values(False)
    for mine in pools(2).run(edge_values, True) + [edge_values(True)]:
        assert mine.pop("empty_tracegraph_differentiable_loss") == 0.0
        for key in [k for k in reference if k.startswith("empty")]:
            assert mine[key] == reference[key] == 0.0 and type(mine[key]) is type(reference[key]), key
        assert_close(mine["no_params_loss"], reference["no_params_loss"])
        assert_close(mine["no_params_differentiable_loss"], reference["no_params_differentiable_loss"])
        assert not getattr(mine["no_params_differentiable_loss"], "requires_grad", False)


def hooks_see_partial_gradients():
    """Tensor hooks on parameters run in the local backward pass: they see this rank's share."""
    x, y = make_data(0)
    elbo = pyro_sp.DistributedTrace_ELBO(num_particles=4, vectorize_particles=True)
    elbo.loss(model, param_guide, x, y)
    seen = []
    w_loc = pyro.param("w_loc").unconstrained()
    w_loc.register_hook(lambda g: seen.append(g.clone()))
    w_loc.grad = None
    elbo.loss_and_grads(model, param_guide, x, y)
    return seen[0], w_loc.grad.clone()


def test_hooks_see_the_partial_gradient_and_grad_holds_the_estimator(pools):
    (hook0, grad0), (hook1, grad1) = pools(2).run(hooks_see_partial_gradients)
    assert torch.equal(grad0, grad1)
    assert not torch.equal(hook0, hook1)
    assert_close(hook0 + hook1, grad0)
