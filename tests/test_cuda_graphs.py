# SPDX-License-Identifier: Apache-2.0
"""``MeanFieldVI(cuda_graphs=True)`` against the same compiled steps without graphs, on a CUDA
device (skipped without one): bitwise the same losses, gradients and parameters through
recaptures (a smaller batch, a new learning rate, a loaded optimizer state), two batch sizes
taking turns, a tensor learning
rate updated in place, an optimizer that is not capturable, gradients given by the graph,
gradient accumulation, and the caller's random state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pyro_sp.nn import BayesianModule, MeanFieldVI

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device"),
    # torch.compile's own advice (e.g. to use TF32: fp32 products on both sides here, compared bitwise)
    pytest.mark.filterwarnings("ignore::UserWarning:torch._inductor.*"),
]

NOISE = ("stored", "regenerated")


@pytest.fixture(autouse=True)
def _static_shapes():
    """One compiled program per batch size on both sides: after a second size, torch.compile would
    otherwise compile a dynamic-shape program that the run without graphs uses for the first size
    again while the graph replays the first size's program (both right, not bitwise equal)."""
    torch._dynamo.reset()  # and each test's programs within torch.compile's limit of recompilations
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        yield


def _vi(weight_noise: str, graphs: bool, **kwargs) -> MeanFieldVI:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    return MeanFieldVI(BayesianModule(net, prior_scale="fan_in"), num_particles=4, seed=3, init_scale=0.05,
                       kl="analytic", weight_noise=weight_noise, compile=True, cuda_graphs=graphs,
                       **kwargs).cuda()


def _batches(sizes):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 24, generator=g).cuda(), torch.randint(0, 5, (n,), generator=g).cuda()) for n in sizes]


def _params(vi):
    return [p for p in vi.parameters() if p.requires_grad]


def _train(weight_noise, graphs, batches, optimizer=None, before_step=None):
    vi = _vi(weight_noise, graphs)
    make = optimizer or (lambda ps: torch.optim.Adam(ps, lr=1e-2, capturable=True))
    optim = make(_params(vi))
    losses = []
    for t, (x, y) in enumerate(batches):
        if before_step is not None:
            before_step(optim, t)
        losses.append(vi.step(optim, x, y))
    params = _params(vi)
    return vi, torch.stack(losses), [p.detach().clone() for p in params] + [p.grad.clone() for p in params]


def _assert_same(plain, graphs):
    """The same losses, parameters and gradients, bitwise."""
    _, loss_a, params_a = plain
    vi, loss_b, params_b = graphs
    assert torch.equal(loss_a, loss_b), (loss_a, loss_b)
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b), float((a - b).abs().max())
    return vi._graphs


@pytest.mark.parametrize("weight_noise", NOISE)
def test_graph_steps_equal_steps_without_graphs(weight_noise):
    """A smaller batch and a new float learning rate are new keys: each runs once without a graph,
    then is captured; returning to the first batch size replays the kept graph."""
    batches = _batches([16, 16, 16, 7, 7, 7, 16, 16, 16, 16])

    def schedule(optim, t):
        if t == 8:
            optim.param_groups[0]["lr"] = 3e-3

    plain = _train(weight_noise, False, batches, before_step=schedule)
    graphs = _assert_same(plain, _train(weight_noise, True, batches, before_step=schedule))
    # keys: (16, no state) eager; (16) eager, captured, replayed; (7) eager, captured, replayed;
    # (16) replayed x2; (16, new lr) eager, captured
    assert graphs.captures == 3 and graphs.replays == 6


def test_keys_taking_turns_are_both_captured():
    """Two batch sizes taking turns from the first step: each runs once without a graph, and is
    captured the next time it comes, with the other's step in between."""
    batches = _batches([16, 7] * 4)
    plain = _train("regenerated", False, batches)
    graphs = _assert_same(plain, _train("regenerated", True, batches))
    # keys: (16, no optimizer state) eager; (7) eager; (16) eager; (7) captured and replayed;
    # (16) captured and replayed; three replays
    assert graphs.captures == 2 and graphs.replays == 5


def test_tensor_learning_rate_updated_in_place_keeps_the_graph():
    lr = torch.tensor(1e-2, device="cuda")

    def schedule(optim, t):
        optim.param_groups[0]["lr"].fill_(1e-2 * 0.7 ** t)

    batches = _batches([16] * 6)
    plain = _train("stored", False, batches, lambda ps: torch.optim.Adam(ps, lr=lr.clone(), capturable=True),
                   schedule)
    graphs = _assert_same(plain, _train("stored", True, batches,
                                        lambda ps: torch.optim.Adam(ps, lr=lr.clone(), capturable=True), schedule))
    assert graphs.captures == 1 and graphs.replays == 4


def test_optimizer_that_is_not_capturable_runs_after_the_graph():
    batches = _batches([16] * 5)
    plain = _train("regenerated", False, batches, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    with pytest.warns(UserWarning, match=r"SGD is not capturable.*capturable=True"):
        graphs = _train("regenerated", True, batches, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    assert _assert_same(plain, graphs).replays == 4


def test_loaded_optimizer_state_is_a_new_graph():
    batches = _batches([16] * 7)

    def reload(optim, t):
        if t == 4:
            optim.load_state_dict(copy.deepcopy(optim.state_dict()))

    plain = _train("stored", False, batches, before_step=reload)
    graphs = _assert_same(plain, _train("stored", True, batches, before_step=reload))
    assert graphs.captures == 2


def test_gradients_given_by_the_graph():
    """The optimizer's gradients are the graph's own tensors (the same ones replay after replay),
    equal to those of the step without graphs; an optimizer parameter outside the model has its
    gradient zeroed, and a parameter the optimizer does not hold accumulates, as without graphs."""
    batches = _batches([16] * 6)
    runs = []
    for graphs in (False, True):
        vi = _vi("regenerated", graphs)
        held, left_out = _params(vi)[1:], _params(vi)[0]
        extra = torch.ones(3, device="cuda", requires_grad=True)
        extra.grad = torch.full_like(extra, 5.0)
        optim = torch.optim.Adam(held + [extra], lr=1e-2, capturable=True)
        addresses, losses = [], []
        for x, y in batches:
            losses.append(vi.step(optim, x, y))
            addresses.append([p.grad.data_ptr() for p in held])
            assert torch.equal(extra.grad, torch.zeros_like(extra))
        runs.append((torch.stack(losses), [p.detach().clone() for p in _params(vi)],
                     [p.grad.clone() for p in _params(vi)], left_out.grad.clone()))
    # eager steps 1-2, then the graph's own tensors, the same ones replay after replay
    assert addresses[2] == addresses[3] == addresses[4] == addresses[5] != addresses[1]
    assert vi._graphs.replays == 4
    (entry,) = vi._graphs._entries.values()
    assert {id(p) for p, _ in entry.gives} == set(map(id, held)) and all(p.grad is g for p, g in entry.gives)
    (loss_a, params_a, grads_a, acc_a), (loss_b, params_b, grads_b, acc_b) = runs
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(params_a + grads_a, params_b + grads_b, strict=True):
        assert torch.equal(a, b), float((a - b).abs().max())
    assert torch.equal(acc_a, acc_b) and acc_a.abs().sum() > 0


@pytest.mark.parametrize("weight_noise", NOISE)
def test_loss_and_backward_accumulates_like_without_graphs(weight_noise):
    """Without zeroing in between, each call adds its gradients to those already there."""
    x, y = _batches([16])[0]
    grads = []
    for graphs in (False, True):
        vi = _vi(weight_noise, graphs)
        losses = torch.stack([vi.loss_and_backward(x, y) for _ in range(4)])
        grads.append((losses, [p.grad.clone() for p in _params(vi)]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.equal(a, b)
    assert vi._graphs.replays == 3


def test_the_callers_random_state_is_untouched():
    """A replay seeds the generator with the step's stream and gives the caller's state back."""
    vi = _vi("regenerated", True)
    optim = torch.optim.Adam(_params(vi), lr=1e-2, capturable=True)
    for x, y in _batches([16] * 4):
        before = torch.cuda.get_rng_state()
        vi.step(optim, x, y)
        assert torch.equal(torch.cuda.get_rng_state(), before)
    assert vi._graphs.replays == 2


def test_non_finite_loss_raises_with_check_always():
    """With check="always" the update runs after the graph, once the loss is known to be finite."""
    vi = _vi("stored", True, check="always")
    optim = torch.optim.Adam(_params(vi), lr=1e-2, capturable=True)
    batches = _batches([16] * 3)
    for x, y in batches[:2]:
        vi.step(optim, x, y)
    with torch.no_grad():
        vi.posterior.locs[0].fill_(float("nan"))
    before = [p.detach().clone() for p in _params(vi)]
    with pytest.raises(FloatingPointError, match="MeanFieldVI's loss is nan at step 3"):
        vi.step(optim, *batches[2])
    for a, p in zip(before, _params(vi)):  # raised before the update, as without graphs
        torch.testing.assert_close(p.detach(), a, rtol=0, atol=0, equal_nan=True)
