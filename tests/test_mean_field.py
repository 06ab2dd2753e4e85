# SPDX-License-Identifier: Apache-2.0
"""MeanFieldVI, the fused step: with pinned noise it equals Pyro's
Trace_ELBO / TraceMeanField_ELBO with an AutoNormal guide on the same
BayesianModule model (float64, 1e-10), in one process, on 2 ranks, with
uneven shares and on a 2 x 2 grid; with real noise its distributed estimate
is unbiased for Pyro's; compiled equals eager; disagreements and failures
stop every rank."""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoNormal
from torch import nn

import pyro_sp
from pyro_sp.nn import BayesianModule, MeanFieldVI, categorical_likelihood, last_layer, normal_likelihood
from tests.common import assert_close, pinned_noise

NUM_DATA = 40
BATCH = 8


def _net(out: int = 3) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, out))


def _data(likelihood: str):
    g = torch.Generator().manual_seed(2)
    device = torch.get_default_device()  # also run on GPUs by benchmarks/nccl_check.py
    x = torch.randn(BATCH, 4, generator=g, device="cpu").to(device)
    if likelihood == "normal":
        return x, torch.randn(BATCH, generator=g, device="cpu").to(device)
    return x, torch.randint(0, 3, (BATCH,), generator=g, device="cpu").to(device)


def _bnn(bayesian, likelihood: str) -> BayesianModule:
    net = _net(1 if likelihood == "normal" else 3)
    selected = last_layer(net) if bayesian == "last" else None
    return BayesianModule(net, prior_scale="fan_in", bayesian=selected)


def _pyro_model(bnn, likelihood: str):
    if likelihood == "normal":
        return lambda x, y: normal_likelihood(bnn(x), y, noise=0.5, num_data=NUM_DATA)
    return lambda x, y: categorical_likelihood(bnn(x), y, num_data=NUM_DATA)


def _mean_field_guide(bnn):
    """A hand-written mean-field Normal guide (AutoNormal's parameter names): TraceMeanField_ELBO
    uses the closed-form KL with it. (With AutoNormal it cannot: AutoNormal samples an auxiliary
    site and returns a Delta, whose KL to the prior is a one-sample estimate.)"""
    shapes = {n: p.shape for n, p in bnn.module.named_parameters()}

    def guide(x, y):
        for n in bnn.bayesian_names:
            loc = pyro.param(f"AutoNormal.locs.{bnn.name}.{n}", lambda n=n: 0.3 * torch.randn(shapes[n]))
            scale = pyro.param(
                f"AutoNormal.scales.{bnn.name}.{n}", lambda n=n: torch.full(shapes[n], 0.05),
                constraint=constraints.softplus_positive,
            )
            pyro.sample(f"{bnn.name}.{n}", dist.Normal(loc, scale).to_event(loc.dim()))

    return guide


def _reference(kl: str, likelihood: str, bayesian, num_particles: int, seed: int):
    """Pyro's estimator, one process, all particles, the full batch: Trace_ELBO with AutoNormal
    (kl="sample") or TraceMeanField_ELBO with a mean-field Normal guide (kl="analytic")."""
    pyro.clear_param_store()
    bnn = _bnn(bayesian, likelihood)
    model = _pyro_model(bnn, likelihood)
    x, y = _data(likelihood)
    if kl == "analytic":
        guide = _mean_field_guide(bnn)
        elbo = TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=True)
    else:
        guide = AutoNormal(model, init_scale=0.05)
        elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    elbo.loss(model, guide, x, y)  # creates the parameters
    state = pyro.get_param_store().get_state()
    torch.manual_seed(seed)
    with pinned_noise(num_particles, 0, num_particles):
        loss = elbo.loss_and_grads(model, guide, x, y)
    grads = {n: p.grad.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
    return bnn, state, loss, grads


def _noise(vi: MeanFieldVI, num_particles: int, seed: int, lo: int, hi: int):
    torch.manual_seed(seed)
    full = [torch.randn((num_particles,) + loc.shape) for loc in vi.posterior.locs]
    return [e[lo:hi] for e in full]


def _fused_grads(vi: MeanFieldVI, prefix: str = "AutoNormal") -> dict:
    bayes, fixed = vi._store_names(prefix)
    grads = {}
    for (loc_name, scale_name), loc, rho in zip(bayes, vi.posterior.locs, vi.posterior.rhos):
        grads[loc_name], grads[scale_name] = loc.grad.clone(), rho.grad.clone()
    for name, p in zip(fixed, vi.posterior.fixed):
        grads[name] = p.grad.clone()
    return grads


def exact_case(kl: str, likelihood: str, bayesian, num_particles: int, sample: int, data: int, compile=False,
               gradient_sync="bucketed"):
    """Runs on every rank (or in the test process with sample = data = 1)."""
    bnn, state, ref_loss, ref_grads = _reference(kl, likelihood, bayesian, num_particles, seed=5)
    pyro.clear_param_store()
    pyro.get_param_store().set_state(state)
    mesh = pyro_sp.SPMesh(sample=sample, data=data)
    vi = MeanFieldVI(
        bnn, likelihood, num_particles=num_particles, num_data=NUM_DATA, noise_scale=0.5, kl=kl, mesh=mesh,
        compile=compile, gradient_sync=gradient_sync,
    )
    vi.load_param_store()
    x, y = _data(likelihood)
    x, y = x.tensor_split(data)[mesh.data_index], y.tensor_split(data)[mesh.data_index]
    lo, hi = mesh.particle_share(num_particles)
    out = {"ref_loss": ref_loss, "ref_grads": ref_grads}
    optim = torch.optim.SGD(vi.parameters(), lr=0.0)  # lr 0: parameters stay, gradients are zeroed
    for round_ in ("first", "second"):  # the first step validates, the second reduces asynchronously
        loss = vi.step(optim, x, y, noise=_noise(vi, num_particles, 5, lo, hi))
        out[round_] = (float(loss), _fused_grads(vi))
    return out


def _check(result):
    assert result["ref_grads"]
    for round_ in ("first", "second"):
        loss, grads = result[round_]
        assert_close(loss, result["ref_loss"], msg=f"{round_} loss")
        assert set(grads) == set(result["ref_grads"])
        for name, ref in result["ref_grads"].items():
            assert_close(grads[name], ref, msg=f"{round_} gradient of {name}")


@pytest.mark.parametrize("kl", ["analytic", "sample"])
@pytest.mark.parametrize("likelihood", ["categorical", "normal"])
@pytest.mark.parametrize("bayesian", ["all", "last"])
def test_single_process_equals_pyro(kl, likelihood, bayesian):
    torch.set_default_dtype(torch.float64)
    _check(exact_case(kl, likelihood, bayesian, 6, 1, 1))


@pytest.mark.parametrize(
    "kl, likelihood, bayesian, num_particles, sample, data",
    [
        ("analytic", "categorical", "all", 6, 2, 1),
        ("sample", "categorical", "last", 5, 2, 1),  # uneven shares: 3 + 2
        ("sample", "normal", "all", 7, 3, 1),  # 3 + 2 + 2
        ("analytic", "categorical", "last", 5, 2, 2),  # a 2 x 2 grid
        ("sample", "normal", "all", 4, 1, 2),  # data parallel only
    ],
)
def test_distributed_equals_pyro(pools, kl, likelihood, bayesian, num_particles, sample, data):
    for result in pools(sample * data).run(exact_case, kl, likelihood, bayesian, num_particles, sample, data):
        _check(result)


@pytest.mark.parametrize("sample, data", [(2, 1), (2, 2), (3, 1)])
def test_flat_gradient_sync_equals_pyro(pools, sample, data):
    """The estimators' strategy (one all-reduce after backward) in MeanFieldVI: the same exact gradient."""
    for result in pools(sample * data).run(exact_case, "sample", "categorical", "all", 5, sample, data,
                                           gradient_sync="flat"):
        _check(result)


def flat_backward_failure_case():
    mesh = pyro_sp.SPMesh(sample=2)
    vi = MeanFieldVI(_bnn("all", "categorical"), num_particles=4, mesh=mesh, seed=0, gradient_sync="flat")
    opt = torch.optim.SGD(vi.parameters(), lr=0.1)
    x, y = _data("categorical")
    fail = {"on": False}

    def hook(grad):
        if fail["on"]:
            raise RuntimeError("simulated out of memory in backward")
        return grad

    vi.posterior.locs[0].register_hook(hook)
    vi.step(opt, x, y)
    fail["on"] = mesh.rank == 1
    try:
        vi.step(opt, x, y)
        error = None
    except Exception as e:  # noqa: BLE001 - the test looks at it
        error = (type(e).__name__, str(e))
    fail["on"] = False
    after = float(vi.step(opt, x, y))  # the flag rode in the reduction: no abort, training goes on
    return error, after, [p.detach().clone() for p in vi.parameters()]


def test_flat_gradient_sync_failure_in_backward_is_raised_everywhere_and_training_goes_on(pools):
    (e0, loss0, p0), (e1, loss1, p1) = pools(2).run(flat_backward_failure_case)
    assert e1 == ("RuntimeError", "simulated out of memory in backward")
    assert e0[0] == "RankError" and "rank 1: RuntimeError: simulated out of memory in backward" in e0[1]
    assert loss0 == loss1 and all(torch.equal(a, b) for a, b in zip(p0, p1))


def test_likelihood_densities_are_pyros():
    """The fused step's log-densities are those of the Pyro sites the model path samples."""
    from pyro_sp.nn.likelihoods import categorical_log_prob, log_likelihood, normal_log_prob

    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5, 4, dtype=torch.float64), torch.randint(0, 4, (5,))
    assert torch.allclose(categorical_log_prob(logits, labels), dist.Categorical(logits=logits).log_prob(labels),
                          rtol=0, atol=1e-12)
    means, targets = torch.randn(3, 5, 1, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert torch.allclose(normal_log_prob(means, targets, 0.7), dist.Normal(means.squeeze(-1), 0.7).log_prob(targets),
                          rtol=0, atol=1e-12)
    assert log_likelihood("categorical") is categorical_log_prob
    with pytest.raises(ValueError, match=r"Expected likelihood in \('categorical', 'normal'\) or a callable, got 'poisson'"):
        log_likelihood("poisson")
    with pytest.raises(ValueError, match="Expected noise_scale > 0, got -1"):
        log_likelihood("normal", -1)


def test_compiled_distributed_equals_pyro(pools):
    """torch.compile of the DDP-wrapped step (one graph, the default), 2 ranks, uneven shares."""
    for result in pools(2).run(exact_case, "sample", "categorical", "all", 5, 2, 1, compile=True):
        _check(result)


def split_case():
    """The compiled graph split at the gradient buckets (several 1 MB buckets) equals the whole graph."""
    mesh = pyro_sp.default_mesh()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    out = []
    for split in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 300), nn.Tanh(), nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 3))
        vi = MeanFieldVI(BayesianModule(net), num_particles=3, mesh=mesh, seed=0, compile=True, bucket_cap_mb=1,
                         split_compiled_graph=split)
        optim = torch.optim.SGD(vi.parameters(), lr=0.0)
        torch.manual_seed(9)
        noise = [torch.randn((3,) + loc.shape)[mesh.particle_share(3)[0]:mesh.particle_share(3)[1]]
                 for loc in vi.posterior.locs]
        loss = vi.step(optim, x, y, noise=noise)
        out.append((float(loss), [p.grad.clone() for p in vi.posterior.trainable()]))
    return out


def test_split_compiled_graph_equals_whole(pools):
    for (whole_loss, whole), (split_loss, split) in pools(2).run(split_case):
        assert_close(split_loss, whole_loss)
        for a, b in zip(split, whole):
            assert_close(a, b)


def compiled_case():
    torch.manual_seed(0)
    bnn = _bnn("all", "categorical")
    x, y = _data("categorical")
    results = []
    for compile_ in (False, True):
        vi = MeanFieldVI(bnn, num_particles=4, num_data=NUM_DATA, kl="sample", compile=compile_)
        optim = torch.optim.SGD(vi.parameters(), lr=0.0)
        loss = vi.step(optim, x, y, noise=_noise(vi, 4, 3, 0, 4))
        results.append((float(loss), [p.grad.clone() for p in vi.parameters() if p.requires_grad]))
    return results


def test_compiled_equals_eager():
    torch.set_default_dtype(torch.float64)
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = compiled_case()
    assert_close(compiled_loss, eager_loss, msg="loss")
    for a, b in zip(compiled_grads, eager_grads):
        assert_close(a, b, msg="gradient")


def unbiased_case(num_draws: int):
    """Real noise: the mean of the distributed estimate over many draws against Pyro's."""
    mesh = pyro_sp.default_mesh()
    bnn, state, _, _ = _reference("sample", "categorical", "all", 4, seed=0)
    model = _pyro_model(bnn, "categorical")
    x, y = _data("categorical")
    guide = AutoNormal(model, init_scale=0.05)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
    torch.manual_seed(mesh.rank + 11)  # the reference's draws differ on each rank: it runs alone
    pyro_losses = torch.tensor([elbo.loss(model, guide, x, y) for _ in range(num_draws)])
    vi = MeanFieldVI(bnn, num_particles=4, num_data=NUM_DATA, kl="sample", mesh=mesh, seed=3)
    vi.load_param_store()
    ours = torch.tensor([vi.loss(x, y) for _ in range(num_draws)])
    return pyro_losses, ours


def test_unbiased_on_two_ranks(pools):
    results = pools(2).run(unbiased_case, 400)
    ours = results[0][1]
    assert torch.equal(ours, results[1][1]), "the ranks disagree on the reduced loss"
    pyro_losses = torch.cat([r[0] for r in results])
    se = (pyro_losses.var() / len(pyro_losses) + ours.var() / len(ours)).sqrt()
    assert abs(ours.mean() - pyro_losses.mean()) < 4 * se
    # four particles from two independent streams: the variance is the one of 4, not of 2
    ratio = ours.var() / pyro_losses.var()
    assert 0.7 < ratio < 1.4, ratio


def training_case(steps: int):
    mesh = pyro_sp.default_mesh()
    torch.manual_seed(0)
    bnn = _bnn("all", "categorical")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 4, generator=g)  # enough data for a posterior narrower than the prior
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    x, y = x.tensor_split(mesh.data)[mesh.data_index], y.tensor_split(mesh.data)[mesh.data_index]
    vi = MeanFieldVI(bnn, num_particles=8, num_data=512, mesh=mesh, seed=0)
    optim = torch.optim.Adam(vi.parameters(), lr=0.05)
    losses = [float(vi.step(optim, x, y)) for _ in range(steps)]
    probs = vi.predict(x, 16).softmax(-1).mean(0)
    accuracy = float((probs.argmax(-1) == y).double().mean())
    return losses, accuracy, [p.detach().clone() for p in vi.parameters()]


def test_training_keeps_ranks_identical(pools):
    results = pools(4).run(training_case, 60)
    for losses, accuracy, params in results:
        assert losses[-1] < 0.5 * losses[0]
        assert accuracy > 0.85
        for a, b in zip(params, results[0][2]):
            assert torch.equal(a, b), "parameters differ across ranks"


def _straight_and_resumed(path, mesh, x, y, *, num_particles, steps, save_at, evaluate_on_rank_0=False):
    """``steps`` steps, saving rank 0's state dicts before step ``save_at``; then a fresh object
    loads the file and makes the remaining steps. Returns both objects' parameters."""

    def fresh():
        torch.manual_seed(0)
        vi = MeanFieldVI(_bnn("all", "categorical"), num_particles=num_particles, num_data=NUM_DATA, mesh=mesh,
                         seed=1)
        return vi, torch.optim.Adam([p for p in vi.parameters() if p.requires_grad], lr=0.05)

    vi, optim = fresh()
    for step in range(steps):
        if evaluate_on_rank_0 and mesh.rank == 0:
            vi.predict(x, 4)  # evaluation on one rank only
        if step == save_at and mesh.rank == 0:
            torch.save({"vi": vi.state_dict(), "optim": optim.state_dict()}, path)
        vi.step(optim, x, y)
    torch.distributed.barrier()
    resumed, optim2 = fresh()
    state = torch.load(path, weights_only=False)
    resumed.load_state_dict(state["vi"])
    optim2.load_state_dict(state["optim"])
    for _ in range(steps - save_at):
        resumed.step(optim2, x, y)
    return [p.detach().clone() for p in vi.parameters()], [p.detach().clone() for p in resumed.parameters()]


def resume_case(path: str):
    """Six steps on the sample axis; save at step 3; a fresh object resumes from the file."""
    x, y = _data("categorical")
    return _straight_and_resumed(path, pyro_sp.default_mesh(), x, y, num_particles=5, steps=6, save_at=3)


def test_resume_is_bit_identical(pools, tmp_path):
    for straight, resumed in pools(2).run(resume_case, str(tmp_path / "vi.pt")):
        for a, b in zip(straight, resumed):
            assert torch.equal(a, b)


def nonfinite_case():
    vi = MeanFieldVI(_bnn("all", "categorical"), num_particles=2, mesh=pyro_sp.default_mesh(), check="always")
    x, y = _data("categorical")
    with torch.no_grad():
        vi.posterior.locs[0].fill_(float("nan"))
    vi.step(torch.optim.SGD(vi.parameters(), lr=0.1), x, y)


def callable_likelihood_case():
    """A function as likelihood on a mesh (its repr differs per process) equals the built-in one."""
    mesh = pyro_sp.default_mesh()
    x, y = _data("categorical")

    def my_categorical(out, y):
        return out.log_softmax(-1).gather(-1, y.expand(out.shape[:2]).unsqueeze(-1)).squeeze(-1)

    losses = []
    for likelihood in ("categorical", my_categorical):
        vi = MeanFieldVI(_bnn("all", "categorical"), likelihood, num_particles=4, mesh=mesh, seed=2)
        losses.append(vi.loss(x, y))
    return losses


def test_callable_likelihood_on_a_mesh(pools):
    for builtin, custom in pools(2).run(callable_likelihood_case):
        assert_close(custom, builtin)


def broadcast_case():
    """Parameters agree before the first step: loss and predictions use rank 0's values."""
    mesh = pyro_sp.default_mesh()
    torch.manual_seed(mesh.rank)  # a different network on every rank
    vi = MeanFieldVI(BayesianModule(nn.Linear(4, 3)), num_particles=4, mesh=mesh, seed=0)
    return [p.detach().clone() for p in vi.posterior.trainable()]


def test_parameters_broadcast_at_construction(pools):
    first, second = pools(2).run(broadcast_case)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 2)

    def forward(self, x):
        return self.body(x)


def unused_case():
    """A deterministic parameter the forward never uses: warned about, left out, steps keep working."""
    import warnings

    mesh = pyro_sp.default_mesh()
    torch.manual_seed(0)
    vi = MeanFieldVI(BayesianModule(WithUnused(), bayesian="body"), num_particles=4, mesh=mesh, seed=0)
    optim = torch.optim.Adam([p for p in vi.parameters() if p.requires_grad], lr=0.01)
    x, y = _data("categorical")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            vi.step(optim, x, y)
    return [str(w.message) for w in caught], [p.detach().clone() for p in vi.posterior.trainable()]


def test_unused_parameters_are_left_out(pools):
    results = pools(2).run(unused_case)
    for messages, params in results:
        assert any("unused.weight" in m and "no gradient" in m for m in messages), messages
        for a, b in zip(params, results[0][1]):
            assert torch.equal(a, b)


def resume_with_evaluation_case(path: str):
    """Rank 0 evaluates between steps (data axis: no collective), saves, and every rank resumes."""
    mesh = pyro_sp.SPMesh(sample=1, data=2)
    x, y = _data("categorical")
    x, y = x.tensor_split(2)[mesh.data_index], y.tensor_split(2)[mesh.data_index]
    return _straight_and_resumed(path, mesh, x, y, num_particles=3, steps=5, save_at=2, evaluate_on_rank_0=True)


def test_resume_with_evaluation_on_one_rank(pools, tmp_path):
    for straight, resumed in pools(2).run(resume_with_evaluation_case, str(tmp_path / "vi.pt")):
        for a, b in zip(straight, resumed):
            assert torch.equal(a, b)


def disagree_case():
    mesh = pyro_sp.default_mesh()
    MeanFieldVI(_bnn("all", "categorical"), num_particles=4 + mesh.rank, mesh=mesh)


def failing_step_case():
    mesh = pyro_sp.default_mesh()
    vi = MeanFieldVI(_bnn("all", "categorical"), num_particles=4, mesh=mesh)
    x, y = _data("categorical")
    if mesh.rank == 1:
        x = x[:, :3]  # a wrong input on one rank only
    vi.step(torch.optim.SGD(vi.parameters(), lr=0.1), x, y)


def test_disagreement_and_failure_stop_every_rank(pools):
    errors = pools(2).run_expecting_errors(disagree_case)
    assert set(errors) == {0, 1}
    for kind, msg, _ in errors.values():  # every rank names the difference and the fix
        assert kind == "ValueError" and "num_particles: rank 0 has 4, rank 1 has 5" in msg
        assert "Make num_particles, the mesh and the model/guide structure the same on every rank." in msg
    errors = pools(2).run_expecting_errors(failing_step_case)
    assert set(errors) == {0, 1}
    assert errors[1][0] == "RuntimeError", errors  # the failing rank: its own error
    assert errors[0][0] == "RankError" and "rank 1: RuntimeError" in errors[0][1], errors
    errors = pools(2).run_expecting_errors(nonfinite_case)
    assert set(errors) == {0, 1}
    for kind, msg, _ in errors.values():
        assert kind == "FloatingPointError" and "MeanFieldVI's loss is nan at step 1 (on every rank)" in msg, msg


def test_argument_errors():
    bnn = _bnn("all", "categorical")
    with pytest.raises(ValueError, match="num_particles"):
        MeanFieldVI(bnn, num_particles=0)
    with pytest.raises(ValueError, match="kl"):
        MeanFieldVI(bnn, num_particles=2, kl="exact")
    with pytest.raises(ValueError, match="likelihood"):
        MeanFieldVI(bnn, "poisson", num_particles=2)
    with pytest.raises(TypeError, match="BayesianModule"):
        MeanFieldVI(_net(), num_particles=2)
    with pytest.raises(ValueError, match=r"Expected gradient_sync in \('flat', 'bucketed'\), got 'ring'"):
        MeanFieldVI(bnn, num_particles=2, gradient_sync="ring")

    class StudentPrior(BayesianModule):
        def prior(self, name):
            return super().prior(name)

    with pytest.raises(ValueError, match="prior"):
        MeanFieldVI(StudentPrior(_net()), num_particles=2)
    vi = MeanFieldVI(bnn, num_particles=2, kl="sample")
    x, y = _data("categorical")
    with pytest.raises(ValueError, match="logits of shape"):
        MeanFieldVI(BayesianModule(nn.Linear(4, 3)), num_particles=2).loss(x[0], y[:1])
    with pytest.raises(KeyError, match="param store"):
        vi.load_param_store()


def test_cuda_graphs_errors():
    """CUDA graphs replay the compiled step: without compile=True, or with parameters off CUDA,
    the error says what to pass (the second at the first step, after a .to() could have moved them)."""
    bnn = _bnn("all", "categorical")
    with pytest.raises(ValueError, match=r"Expected compile=True with cuda_graphs=True, got compile=False.*"
                                         r"MeanFieldVI\(\.\.\., compile=True, cuda_graphs=True\)"):
        MeanFieldVI(bnn, num_particles=2, cuda_graphs=True)
    vi = MeanFieldVI(bnn, num_particles=2, compile=True, cuda_graphs=True)
    x, y = _data("categorical")
    optim = torch.optim.SGD(vi.parameters(), lr=0.1)
    for _ in range(2):  # still refused on a second try: nothing was set up by the first
        with pytest.raises(ValueError, match=r"Expected the parameters on a CUDA device with cuda_graphs=True, "
                                             r"got cpu\. Move the MeanFieldVI with \.to\('cuda'\)"):
            vi.step(optim, x, y)


def cuda_graphs_on_a_mesh_case():
    MeanFieldVI(_bnn("all", "categorical"), num_particles=4, mesh=pyro_sp.default_mesh(), compile=True,
                cuda_graphs=True)


def test_cuda_graphs_refused_on_a_mesh(pools):
    """The graphs capture the whole step: on a mesh every rank refuses cuda_graphs=True at
    construction (after the layout check, so none waits for another)."""
    errors = pools(2).run_expecting_errors(cuda_graphs_on_a_mesh_case)
    for kind, message, _ in errors.values():
        assert kind == "ValueError"
        assert "Expected a one-process mesh with cuda_graphs=True, got 2 processes" in message
        assert "Pass cuda_graphs=False on a mesh" in message


def test_step_graph_keys():
    """A step graph's key changes with what a replay would read at a stale address or value: a
    float or CPU tensor learning rate set anew, an optimizer state loaded, a gradient gone, a
    parameter moved. (A CUDA tensor learning rate, read by the kernels and kept by identity, is
    tested in tests/test_cuda_graphs.py.)"""
    from pyro_sp.nn.step_graph import capturable, optimizer_key, tensors_key

    w = nn.Parameter(torch.randn(3, 2))
    assert capturable(torch.optim.Adam([w], lr=1e-3, capturable=True))
    assert not capturable(torch.optim.Adam([w], lr=1e-3)) and not capturable(object())
    adam = torch.optim.Adam([w], lr=1e-3)  # (a capturable one steps on CUDA only)
    w.grad = torch.ones_like(w)
    adam.step()
    before = optimizer_key(adam)
    assert optimizer_key(adam) == before
    adam.param_groups[0]["lr"] = 2e-3
    assert optimizer_key(adam) != before
    adam.param_groups[0]["lr"] = 1e-3
    assert optimizer_key(adam) == before
    kept = list(adam.state[w].values())  # kept alive: the new tensors cannot take their addresses
    adam.load_state_dict(copy.deepcopy(adam.state_dict()))  # the same values in new tensors
    assert all(new is not old for new, old in zip(adam.state[w].values(), kept))
    assert optimizer_key(adam) != before
    before = optimizer_key(adam)
    w.grad = None  # the update and the zeroing skip it now: a graph would still write it
    assert optimizer_key(adam) != before
    w.grad = torch.ones_like(w)
    # a CPU tensor learning rate is read on the host (a graph holds its value): keyed by value
    lr = torch.tensor(1e-3)
    tensor_lr = torch.optim.Adam([w], lr=lr, capturable=True)
    keyed = optimizer_key(tensor_lr)
    lr.fill_(5e-4)
    assert optimizer_key(tensor_lr) != keyed
    lr.fill_(1e-3)
    assert optimizer_key(tensor_lr) == keyed
    assert optimizer_key(None) == ()
    assert tensors_key([w]) == tensors_key([w]) and tensors_key([w]) != tensors_key([w.detach().clone()])
    assert tensors_key([w], addresses=False) == tensors_key([w.detach().clone()], addresses=False)
    assert tensors_key([w], addresses=False) != tensors_key([w.detach().t().contiguous().t()], addresses=False)
    assert tensors_key([None]) == (None,)


def test_step_key_follows_what_a_replay_reads():
    """MeanFieldVI's step key changes with every setting its compiled step reads as a constant."""
    vi = MeanFieldVI(_bnn("all", "categorical"), num_particles=2)
    x, y = _data("categorical")
    params = [p for p in vi.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)

    def key():
        return vi._step_key(x, y, params, None, True)

    first = key()
    assert key() == first
    assert vi._step_key(x[:1], y[:1], params, None, True) != first
    assert vi._step_key(x, y, params, None, False) != first
    list(vi.modules())[-1].eval()  # one layer of the network
    assert key() != first
    vi.train()
    assert key() == first
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high" if precision == "highest" else "highest")
        assert key() != first
    finally:
        torch.set_float32_matmul_precision(precision)
    torch.set_autocast_enabled("cuda", True)  # (torch.autocast refuses CUDA on a machine without one)
    try:
        assert key() != first
    finally:
        torch.set_autocast_enabled("cuda", False)
    dtype = torch.get_autocast_dtype("cuda")
    torch.set_autocast_dtype("cuda", torch.bfloat16 if dtype != torch.bfloat16 else torch.float16)
    try:
        assert key() != first
    finally:
        torch.set_autocast_dtype("cuda", dtype)
    with torch.backends.cudnn.flags(allow_tf32=not torch.backends.cudnn.allow_tf32):
        assert key() != first
    vi.num_data = 1000
    assert key() != first
    vi.num_data = None
    given = frozenset(map(id, params[:1]))
    with_given = vi._step_key(x, y, params, None, True, given)
    params[0].grad = torch.zeros_like(params[0])  # a gradient at a new address
    assert key() != first
    # unless the step gives that gradient itself (written, not read): the optimizer's part too
    assert vi._step_key(x, y, params, None, True, given) == with_given
    adam = torch.optim.Adam(params, capturable=True)
    before = vi._step_key(x, y, params, adam, True, given)
    params[0].grad = torch.zeros_like(params[0])
    assert vi._step_key(x, y, params, adam, True, given) == before
    params[1].grad = torch.zeros_like(params[1])
    assert vi._step_key(x, y, params, adam, True, given) != before


def test_param_store_round_trip():
    torch.set_default_dtype(torch.float64)
    bnn = _bnn("last", "categorical")
    vi = MeanFieldVI(bnn, num_particles=2, init_scale=0.2)
    with torch.no_grad():
        for p in vi.parameters():
            p.add_(torch.randn_like(p))
    vi.to_param_store()
    other = MeanFieldVI(bnn, num_particles=2)
    other.load_param_store()
    for a, b in zip(vi.posterior.trainable(), other.posterior.trainable()):
        assert_close(a, b)
    # the store now drives Pyro's AutoNormal guide of the same model
    model = _pyro_model(bnn, "categorical")
    guide = AutoNormal(model)
    x, y = _data("categorical")
    guide(x, y)
    medians = guide.median(x, y)
    assert_close(medians["net.2.weight"], vi.posterior.locs[0])
    assert_close(guide._get_loc_and_scale("net.2.bias")[1], torch.nn.functional.softplus(vi.posterior.rhos[1]))


def _gradients_at(vi, x, y, noise):
    params = [p for p in vi.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = vi.loss_and_backward(x, y, noise=noise)
    return loss.double(), torch.cat([p.grad.double().reshape(-1) for p in params])


@pytest.mark.parametrize("precision, low, high", [("fp32", 0.0, 1e-5), ("bf16", 1e-4, 5e-2)])
def test_precision_error_against_float64(precision, low, high):
    # the same pinned noise in float64 (the reference) and in `precision`: bf16 is really
    # bf16 (its error well above fp32's) and close (relative error of a few 1e-3)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    bnn = BayesianModule(net, prior_scale=1.0)
    ref = MeanFieldVI(bnn, num_particles=8, init_scale=0.3, seed=0, kl="sample").double()
    g = torch.Generator().manual_seed(5)
    noise = [torch.randn((8,) + loc.shape, generator=g, dtype=torch.float64) for loc in ref.posterior.locs]
    ref_loss, ref_grad = _gradients_at(ref, x, y, noise)
    vi = MeanFieldVI(bnn, num_particles=8, init_scale=0.3, seed=0, kl="sample", precision=precision).float()
    vi.posterior.load_state_dict({k: v.float() for k, v in ref.posterior.state_dict().items()})
    loss, grad = _gradients_at(vi, x.float(), y, [n.float() for n in noise])
    loss_error = float(abs(loss - ref_loss) / abs(ref_loss))
    grad_error = float((grad - ref_grad).norm() / ref_grad.norm())
    assert low <= grad_error < high, grad_error
    assert loss_error < high, loss_error
    with pytest.raises(ValueError, match=r"Expected precision in \('fp32', 'bf16'\), got 'fp16'"):
        MeanFieldVI(bnn, num_particles=2, precision="fp16")
