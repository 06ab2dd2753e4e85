# SPDX-License-Identifier: Apache-2.0
"""The :class:`DistributedELBO` mixin shared by every sharded estimator."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import pyro
import torch
import torch.distributed as dist
from pyro import poutine

from pyro_sp.collectives import (
    all_reduce_gradients,
    broadcast_tensors,
    gather_rows,
    layout_signature,
    step_check,
)
from pyro_sp.mesh import SPMesh, default_mesh, share_counts
from pyro_sp.poutine import ShardParticlesMessenger
from pyro_sp.rng import RNGStream, derive_seed

__all__ = ["DistributedELBO"]

#: How often a call is repeated because new parameters appeared in it.
_MAX_SETUP_ROUNDS = 3


class DistributedELBO:
    """
    Mixin that turns a linear Pyro ELBO into its sampling-parallel version.

    Put it first in the bases: ``class DistributedTrace_ELBO(DistributedELBO,
    Trace_ELBO)``. The Pyro estimator runs unchanged on each rank's share of the
    vectorized particle plate (see
    :class:`~pyro_sp.poutine.ShardParticlesMessenger`); this mixin adds the
    synchronisation that makes the result the single-process estimator.

    For a linear estimator with particles :math:`z_1, \\dots, z_N` split into
    ranks' ranges :math:`[lo_r, hi_r)` on the sample axis and :math:`D` data
    groups each with its own minibatch :math:`x_d`,

    .. math::

        \\mathcal{L} = \\frac{1}{D} \\sum_{d=1}^{D} \\sum_{r}
            \\frac{1}{N} \\sum_{k=lo_r}^{hi_r - 1}
            \\big[\\log q(z_k) - \\log p(x_d, z_k)\\big],

    so one all-reduce SUM over the whole world, divided by :math:`D`, gives the
    loss and, applied to gradients, its gradient exactly.

    What the mixin does on every call when a process group exists:

    1. runs the estimator with this rank's particles, its own particle-noise
       stream and the data-subsample stream of its data group;
    2. one small all-reduce carries the partial losses and a signature of
       ``num_particles``, mesh and parameter names/shapes: a rank that failed
       or disagrees makes every rank raise;
    3. parameters that no collective has seen yet are broadcast from rank 0,
       with the model's and guide's module buffers, and the call is run again,
       so no gradient is ever computed from unsynchronised values;
    4. gradients of this call only are summed over the world in one flat
       all-reduce per (dtype, device) (name order) and divided by :math:`D`;
       gradients that were already accumulated are kept.

    Nonlinear estimators (Renyi, tail-adaptive) gather over the sample axis
    after step 2; a rank that fails there (e.g. out of memory in ``backward``)
    leaves the others waiting until the collective timeout.

    Without a process group the Pyro estimator runs untouched: the result is
    bit-identical to Pyro's.

    :param int num_particles: the *global* number of particles :math:`N`
        (at least the sample axis size).
    :param SPMesh mesh: the process grid; default :func:`~pyro_sp.default_mesh`.
    :param int seed: seed of the per-rank particle-noise and per-data-group
        subsample streams; default: rank 0's :func:`torch.initial_seed`, so a
        :func:`pyro.set_rng_seed` on rank 0 fixes the run.
    :param bool vectorize_particles: split the vectorized particle plate
        (default); with ``False`` each rank runs its share of Pyro's sequential
        particle loop, for models that cannot be vectorized.
    :param kwargs: the remaining arguments of the Pyro estimator.

    References

    [1] Özdemir, Heyen, Weyrauch, Streit, Götz, Debus,
        `Sampling Parallelism for Fast and Efficient Bayesian Learning`, 2026,
        arXiv:2604.04736.
    """

    def __init__(
        self,
        num_particles: int = 1,
        *,
        mesh: SPMesh | None = None,
        seed: int | None = None,
        vectorize_particles: bool = True,
        **kwargs,
    ) -> None:
        self.mesh = default_mesh() if mesh is None else mesh
        if not isinstance(num_particles, int) or num_particles < self.mesh.sample:
            raise ValueError(
                f"Expected num_particles >= {self.mesh.sample} (the sample axis size), got "
                f"{num_particles!r}. Use more particles or a smaller sample axis."
            )
        super().__init__(
            num_particles=num_particles, vectorize_particles=vectorize_particles, **kwargs
        )
        self.seed = seed
        self._particle_rng: RNGStream | None = None
        self._subsample_rng: RNGStream | None = None
        self._synced: dict[int, weakref.ref] = {}
        self._last_params: list[torch.Tensor] = []
        self._share: tuple[int, int] | None = None  # this rank's particles, during a call

    # ---- the three interfaces ---------------------------------------------------
    def loss(self, model, guide, *args, **kwargs):
        """The global loss (all particles, averaged over data groups), on every rank."""
        return self._sharded("loss", super().loss, model, guide, args, kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """The global loss; adds the global gradient of this call to ``.grad`` on every rank."""
        return self._sharded("loss_and_grads", super().loss_and_grads, model, guide, args, kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """
        A tensor whose value is the global loss and whose ``.backward()`` adds
        the global gradient to ``.grad`` on every rank (all ranks must call
        ``backward``).
        """
        return self._sharded(
            "differentiable_loss", super().differentiable_loss, model, guide, args, kwargs
        )

    # ---- checkpointing ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's random streams (each rank's differ): save them to resume bit-identically."""
        streams = self._particle_rng, self._subsample_rng
        return {
            "seed": self.seed,
            "streams": None if streams[0] is None else tuple((r.seed, r.get_state()) for r in streams),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's random streams from :meth:`state_dict`."""
        self.seed = state["seed"]
        if state["streams"] is None:
            self._particle_rng = self._subsample_rng = None
            return
        rngs = []
        for seed, snapshot in state["streams"]:
            rng = RNGStream(seed)
            rng.set_state(snapshot)
            rngs.append(rng)
        self._particle_rng, self._subsample_rng = rngs

    # ---- setup --------------------------------------------------------------------
    @property
    def _world(self):
        return self.mesh.get_group("world")

    def _setup_streams(self) -> None:
        if self._particle_rng is not None:
            return
        seed = self.mesh.shared_seed(self.seed)
        self._particle_rng = RNGStream(derive_seed(seed, "particles", self.mesh.rank))
        self._subsample_rng = RNGStream(derive_seed(seed, "subsample", self.mesh.data_index))

    def _shard_messenger(self) -> ShardParticlesMessenger:
        lo, hi = self._share
        return ShardParticlesMessenger(
            lo, hi, self.num_particles, subsample_rng=self._subsample_rng
        )

    # ---- hooks for estimator families ------------------------------------------------
    #: ``True`` for estimators whose loss is a sum over particles: the partial
    #: losses add up. Nonlinear estimators set it to ``False`` and implement
    #: :meth:`_combine`.
    _linear = True

    def _is_local_param(self, name: str) -> bool:
        """Per-rank state that is neither broadcast nor reduced (none by default)."""
        return False

    def _combine(self, kind: str, payload):
        """
        Second phase of a nonlinear estimator, entered by every rank after the
        step check: the collectives that couple the particles (e.g. a gather of
        log-weights over the sample axis) and, for ``loss_and_grads``, the
        backward pass of the local surrogate.

        :returns: ``(loss of this data group, result)``.
        """
        raise NotImplementedError

    def _get_traces(self, model, guide, args, kwargs):
        if self.vectorize_particles or self._share is None:
            yield from super()._get_traces(model, guide, args, kwargs)
            return
        # Sequential particles: run this rank's share of Pyro's particle loop.
        # Pyro's generators read num_particles once, when their loop starts, so
        # they are shown the share for that moment; the estimators still divide
        # by the global num_particles.
        lo, hi = self._share
        traces = super()._get_traces(model, guide, args, kwargs)
        total, self.num_particles = self.num_particles, hi - lo
        try:
            first = next(traces, None)
        finally:
            self.num_particles = total
        if first is not None:
            yield first
            yield from traces

    # ---- one call -----------------------------------------------------------------
    def _sharded(self, kind: str, method: Callable, model, guide, args, kwargs):
        # Without a process group, Pyro's estimator runs untouched. Inside a sharded
        # call (a Pyro method that calls another public method, e.g. a loss_and_grads
        # built on differentiable_loss) the outer call already shards and reduces.
        if self._share is not None:
            return method(model, guide, *args, **kwargs)
        if not self.mesh.is_distributed:
            if self._linear:
                return method(model, guide, *args, **kwargs)
            loss, result = self._combine(kind, method(model, guide, *args, **kwargs))
            return result if kind == "differentiable_loss" else loss
        self._setup_streams()
        # a setup round (new parameters) rewinds the streams: the call's result is the
        # same as if the parameters had been synchronised beforehand
        rng_states = self._particle_rng.get_state(), self._subsample_rng.get_state()
        local_state = self._local_state()
        for _ in range(_MAX_SETUP_ROUNDS):
            self._particle_rng.set_state(rng_states[0])
            self._subsample_rng.set_state(rng_states[1])
            stash = self._stash_grads(model, guide) if kind == "loss_and_grads" else None
            payload, error, params = None, None, {}
            self._share = self.mesh.particle_share(self.num_particles)
            try:
                with self._particle_rng, self._shard_messenger(), poutine.trace(
                    param_only=True
                ) as capture:
                    payload = method(model, guide, *args, **kwargs)
                params = _collect_params(capture.trace, model, guide, self._is_local_param)
            except Exception as e:  # reported to every rank by step_check
                error = e
            finally:
                self._share = None
            names = sorted(params)
            fresh = [n for n in names if not self._is_synced(params[n])]
            layout = {
                "num_particles": self.num_particles,
                "mesh": (self.mesh.sample, self.mesh.data),
                "params": {n: tuple(params[n].shape) for n in names},
                "unsynchronised": fresh,  # every rank must agree to broadcast
            }
            try:
                total = step_check(
                    0.0 if error is not None or not self._linear else _as_float(payload),
                    layout_signature(layout),
                    error,
                    group=self._world,
                    device=self.mesh.device,
                    describe=lambda: layout,
                )
            except Exception:
                if stash is not None:  # give back the gradients held before the call
                    self._restore_grads(stash, params.values(), reduced=None)
                raise
            if not fresh:
                break
            self._broadcast_new([params[n] for n in fresh], model, guide)
            self._restore_local_state(local_state)
            if stash is not None:
                self._restore_grads(stash, params.values(), reduced=None)
        else:
            raise RuntimeError(
                f"New parameters kept appearing in {_MAX_SETUP_ROUNDS} consecutive runs of "
                "the same call; pyro_sp needs the parameter set of a call to be stable "
                "once created."
            )
        ordered = [params[n] for n in names]
        self._last_params = ordered
        if self._linear:
            global_loss, result = total / self.mesh.data, payload
        else:
            group_loss, result = self._combine(kind, payload)
            global_loss = self._data_mean(group_loss)
        if kind == "loss":
            return global_loss
        if kind == "loss_and_grads":
            reduced = all_reduce_gradients(
                ordered, [p.grad for p in ordered], group=self._world, scale=1.0 / self.mesh.data
            )
            self._restore_grads(stash, ordered, reduced=reduced)
            return global_loss
        return _SyncGradients.apply(result, global_loss, _GradientSync(self, ordered))

    def _gather_particles(self, tensor: torch.Tensor) -> torch.Tensor:
        """All ``num_particles`` rows of a per-particle tensor, gathered over the sample axis."""
        if not self.mesh.is_distributed or self.mesh.sample == 1:
            return tensor
        counts = share_counts(self.num_particles, self.mesh.sample)
        return gather_rows([tensor], counts, group=self.mesh.get_group("sample"))[0]

    def _data_mean(self, group_loss: float) -> float:
        """Average a per-data-group loss (equal on the ranks of a sample group) over the data axis."""
        if self.mesh.data == 1:
            return group_loss
        t = torch.tensor([group_loss / self.mesh.world_size], dtype=torch.float64, device=self.mesh.device)
        dist.all_reduce(t, group=self._world)
        return t.item()

    # ---- parameter and gradient bookkeeping ----------------------------------------
    def _local_state(self) -> dict[str, torch.Tensor] | None:
        """Values of the per-rank parameters before a call (``None`` if the family has none)."""
        if type(self)._is_local_param is DistributedELBO._is_local_param:
            return None
        store = pyro.get_param_store()
        return {n: store[n].detach().clone() for n in store.keys() if self._is_local_param(n)}

    def _restore_local_state(self, state: dict[str, torch.Tensor] | None) -> None:
        """Undo a setup round's updates of per-rank parameters, so the re-run starts where the call did."""
        if state is None:
            return
        store = pyro.get_param_store()
        for name in [n for n in store.keys() if self._is_local_param(n)]:
            if name in state:
                store[name] = state[name]
            else:
                del store[name]

    def _is_synced(self, t: torch.Tensor) -> bool:
        ref = self._synced.get(id(t))
        return ref is not None and ref() is t

    def _broadcast_new(self, tensors: list[torch.Tensor], model, guide) -> None:
        buffers = [
            b
            for m in (model, guide)
            if isinstance(m, torch.nn.Module)
            for _, b in sorted(m.named_buffers())
        ]
        broadcast_tensors(tensors + buffers, group=self._world, src=0)
        self._synced = {k: r for k, r in self._synced.items() if r() is not None}
        for t in tensors:
            self._synced[id(t)] = weakref.ref(t)

    def _stash_grads(self, model, guide) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """
        Take away the gradients accumulated before this call from every
        parameter the call may touch (param store, model and guide modules,
        the last call's), so the call's own increment is isolated.
        """
        candidates = list(self._last_params)
        candidates += [p for _, p in pyro.get_param_store().named_parameters()]
        for module in (model, guide):
            if isinstance(module, torch.nn.Module):
                candidates += list(module.parameters())
        return _stash(candidates)

    def _restore_grads(self, stash, params, *, reduced) -> None:
        """``.grad = earlier + reduced increment``; with ``reduced=None`` drop the increment."""
        params = list(params)
        increments = [None] * len(params) if reduced is None else reduced
        for p, inc in zip(params, increments):
            before = stash.pop(id(p), (p, None))[1]
            if inc is None:
                p.grad = before
            elif before is None:
                p.grad = inc
            else:
                p.grad = before + inc
        for p, before in stash.values():  # parameters not used in this call
            p.grad = before


class _GradientSync:
    """Reduces the gradients of one ``differentiable_loss`` result when its backward pass ends."""

    def __init__(self, elbo: DistributedELBO, params: list[torch.Tensor]) -> None:
        self.elbo, self.params = elbo, params

    def arm(self) -> None:
        stash = _stash(self.params)

        def finish() -> None:
            grads = [p.grad for p in self.params]
            reduced = all_reduce_gradients(
                self.params, grads, group=self.elbo._world, scale=1.0 / self.elbo.mesh.data
            )
            self.elbo._restore_grads(stash, self.params, reduced=reduced)

        torch.autograd.Variable._execution_engine.queue_callback(finish)


class _SyncGradients(torch.autograd.Function):
    """Identity on the gradient path whose value is the global loss; its backward arms the reduction."""

    @staticmethod
    def forward(ctx, local, global_value, sync):
        ctx.sync = sync
        return torch.full_like(local, global_value)

    @staticmethod
    def backward(ctx, grad):
        ctx.sync.arm()
        return grad, None, None


def _stash(params) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """Set ``.grad = None`` on ``params`` and return what they held, by tensor identity."""
    stash = {}
    for p in params:
        if id(p) not in stash:
            stash[id(p)] = (p, p.grad)
            p.grad = None
    return stash


def _as_float(value) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _collect_params(trace, model, guide, is_local=lambda name: False) -> dict[str, torch.Tensor]:
    """Trainable leaf tensors used in this call, by name: param sites first, then module parameters."""
    params: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, site in trace.nodes.items():
        if site["type"] != "param" or is_local(name):
            continue
        value = site["value"]
        unconstrained = getattr(value, "unconstrained", None)
        leaf = unconstrained() if callable(unconstrained) else value
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad and id(leaf) not in seen:
            params[name] = leaf
            seen.add(id(leaf))
    for prefix, module in (("model", model), ("guide", guide)):
        if isinstance(module, torch.nn.Module):
            for name, p in module.named_parameters():
                if p.requires_grad and id(p) not in seen:
                    params[f"{prefix}.{name}"] = p
                    seen.add(id(p))
    return params
