# SPDX-License-Identifier: Apache-2.0
"""The :class:`DistributedELBO` mixin shared by every sharded estimator."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import pyro
import torch
from pyro import poutine

from pyro_sp.distributed.collectives import all_reduce_sum, broadcast_tensors, gather_rows
from pyro_sp.distributed.gradients import all_reduce_gradients
from pyro_sp.distributed.guard import Agreement, guarded, raise_failure
from pyro_sp.distributed.failure import abort_everywhere, explained
from pyro_sp.distributed.fingerprint import data_fingerprint, describe_data
from pyro_sp.distributed.mesh import SPMesh, default_mesh, share_counts
from pyro_sp.poutine import ShardParticlesMessenger
from pyro_sp.distributed.streams import RNGStream, draw_key, stream_seed, get_global_state, reseed_global, set_global_state
from pyro_sp.infer.compiled import CompiledCalls

__all__ = ["DistributedELBO"]

#: How often a call is repeated because new parameters appeared in it.
_MAX_SETUP_ROUNDS = 3


class DistributedELBO:
    r"""
    Mixin that turns a linear Pyro ELBO into its sampling-parallel version.

    Put it first in the bases: ``class DistributedTrace_ELBO(DistributedELBO,
    Trace_ELBO)``. The Pyro estimator runs unchanged on each rank's share of the
    particles (see :class:`~pyro_sp.poutine.ShardParticlesMessenger`); this
    mixin adds the synchronisation that makes the result the single-process
    estimator.

    For a linear estimator with particles :math:`z_1, \dots, z_N` split into
    ranks' ranges :math:`[lo_r, hi_r)` on the sample axis and :math:`D` data
    groups each with its own minibatch :math:`x_d`,

    .. math::

        \mathcal{L} = \frac{1}{D} \sum_{d=1}^{D} \sum_{r}
            \frac{1}{N} \sum_{k=lo_r}^{hi_r - 1}
            \big[\log q(z_k) - \log p(x_d, z_k)\big],

    so one all-reduce SUM over the whole world, divided by :math:`D`, gives the
    loss and, applied to gradients, its gradient exactly.

    What the mixin does on every call when a process group exists:

    1. draws one key from the user's global torch RNG. Rank 0 draws its
       particles from the global RNG as it was at entry, exactly as Pyro's
       estimator would (so :func:`pyro.set_rng_seed` reproduces the call,
       and lazily created parameters take Pyro's initial values); every
       other rank uses a particle-noise stream derived from the key and its
       rank, and every rank a subsample stream derived from the key and its
       data group. On exit the global RNG of every rank is reseeded from the
       key, so successive calls draw fresh noise;
    2. one small all-reduce carries the partial losses, a signature of
       ``num_particles``, mesh and parameter names/shapes, and a fingerprint
       of the data arguments and the key per data group: a rank that failed,
       ranks that disagree, or ranks of a sample group that were given
       different data or hold different RNG states make every rank raise
       (a failing rank re-raises its own exception, the others raise
       :class:`~pyro_sp.RankError`);
    3. parameters that no collective has seen yet are broadcast from rank 0,
       with the model's and guide's module buffers; rank 0's run stands (its
       values did not change) and the other ranks run the call again with
       the same streams, so no gradient is ever computed from
       unsynchronised values;
    4. gradients of this call only are summed over the world in one flat
       all-reduce per (dtype, device) (name order) and divided by :math:`D`;
       gradients that were already accumulated are kept. For
       ``differentiable_loss`` the local backward runs inside the call and
       the result carries the reduced gradient, so ``.backward()`` and
       ``torch.autograd.grad`` both give the global gradient (first
       derivatives only) and need no collective.

    Nonlinear estimators (Renyi, tail-adaptive) gather over the sample axis
    after step 2. A rank that fails after the gather (e.g. out of memory in
    ``backward``) joins the next collective with a failure flag, and every
    rank raises; one that fails before it, while the others already wait in
    the gather, stops them by aborting the process groups
    (:mod:`pyro_sp.distributed.failure`).

    With fewer particles than sample ranks, the ranks without a particle
    evaluate one stand-in particle (so parameters and collectives stay the
    same everywhere) and contribute nothing: the result is still exact, but
    those ranks are idle. Use ``num_particles >= mesh.sample``.

    Without a process group the Pyro estimator runs untouched: the result is
    bit-identical to Pyro's.

    :param int num_particles: the *global* number of particles :math:`N`
        (default: the Pyro estimator's, e.g. 1 for ``Trace_ELBO``, 2 for ``RenyiELBO``).
    :param SPMesh mesh: the process grid; default :func:`~pyro_sp.default_mesh`.
    :param compile: ``True`` (or a :func:`torch.compile` backend name, e.g.
        ``"aot_eager"``, or ``"graph"`` for the captured graph without a compiler) to run the calls of a static program as one compiled graph
        (:mod:`pyro_sp.infer.compiled`): the first call runs eagerly (and discovers and
        synchronises the parameters), the second is captured, later ones run compiled;
        loss, gradients and random numbers are those of the eager estimator.
        Trace, TraceMeanField and TraceEnum families only.
    :param bool cuda_graphs: with ``compile``, replay the compiled graph as a CUDA graph
        (inductor's ``mode="reduce-overhead"``): for small, launch-bound models on a GPU.
    :param kwargs: the remaining arguments of the Pyro estimator, with Pyro's
        defaults (``vectorize_particles=False`` included: each rank then runs
        its share of Pyro's sequential particle loop; pass
        ``vectorize_particles=True`` where the model broadcasts over a
        leftmost particle dimension — it is much faster).

    References

    [1] Özdemir, Heyen, Weyrauch, Streit, Götz, Debus,
        `Sampling Parallelism for Fast and Efficient Bayesian Learning`, 2026,
        arXiv:2604.04736.
    """

    #: Whether ``compile=`` is offered (a linear family whose ``differentiable_loss`` is its estimator).
    _compilable = False

    def __init__(self, num_particles: int | None = None, *, mesh: SPMesh | None = None,
                 compile: bool | str = False, cuda_graphs: bool = False, **kwargs) -> None:
        if "seed" in kwargs:
            raise TypeError(
                "Expected no seed= argument: like Pyro's estimators, pyro_sp's draw their noise "
                "from the global torch RNG (one key per call). Call pyro.set_rng_seed(s) with the "
                "same s on every rank instead."
            )
        self.mesh = default_mesh() if mesh is None else mesh
        if num_particles is not None:  # else the Pyro estimator's own default
            kwargs["num_particles"] = num_particles
        super().__init__(**kwargs)
        n = self.num_particles
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(
                f"Expected an integer num_particles >= 1, got {n!r}. "
                "Give the global number of particles."
            )
        self._compiled = self._compiled_calls(compile, cuda_graphs)
        self._synced: dict[int, weakref.ref] = {}
        self._last_params: list[torch.Tensor] = []
        self._share: tuple[int, int] | None = None  # particles evaluated here, during a call
        self._call: _CallShare | None = None  # this rank's share, during a whole call

    def _compiled_calls(self, compile, cuda_graphs) -> CompiledCalls | None:
        name = type(self).__name__
        if compile is False or compile is None:
            if cuda_graphs:
                raise ValueError(f"Expected cuda_graphs=True together with compile=True, got compile={compile!r}. "
                                 f"Pass {name}(..., compile=True, cuda_graphs=True).")
            return None
        if not type(self)._compilable:
            raise TypeError(
                f"Expected compile=False for {name}: compile= is offered by DistributedTrace_ELBO, "
                "DistributedTraceMeanField_ELBO and DistributedTraceEnum_ELBO (linear estimators whose "
                f"differentiable_loss is the estimator), got compile={compile!r}."
            )
        if compile is not True and not isinstance(compile, str):
            raise TypeError(f"Expected compile=True, False or a torch.compile backend name, got {compile!r}.")
        backend = "inductor" if compile is True else compile
        if cuda_graphs and backend != "inductor":
            raise ValueError(f"Expected the inductor backend with cuda_graphs=True, got compile={compile!r}.")
        return CompiledCalls(backend, bool(cuda_graphs), name, speak=self.mesh.rank == 0)

    # ---- the three interfaces ---------------------------------------------------
    def loss(self, model, guide, *args, **kwargs):
        """The global loss (all particles, averaged over data groups), on every rank."""
        return self._sharded("loss", super().loss, model, guide, args, kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """The global loss; adds the global gradient of this call to ``.grad`` on every rank."""
        return self._sharded("loss_and_grads", super().loss_and_grads, model, guide, args, kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """
        A tensor whose value is the global loss and whose gradient is the
        global gradient, for ``.backward()`` and ``torch.autograd.grad`` alike
        (computed and reduced inside the call; first derivatives only).
        """
        return self._sharded(
            "differentiable_loss", super().differentiable_loss, model, guide, args, kwargs
        )

    # ---- checkpointing ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """
        The estimator's own random state: none. Every call draws its key from
        the global torch RNG, which a checkpoint saves per rank
        (:func:`pyro_sp.save_checkpoint`).
        """
        return {"version": 2}

    def load_state_dict(self, state: dict) -> None:
        """Accept a :meth:`state_dict` (also one written by an earlier version, whose streams are obsolete)."""

    # ---- setup --------------------------------------------------------------------
    @property
    def _world(self):
        return self.mesh.get_group("world")

    def _stream_seeds(self, key: int) -> tuple[int | None, int]:
        """
        Seeds of this rank's particle-noise stream and of its data group's
        subsample stream (shared by a sample group), derived from the call's
        key. Rank 0's particle seed is ``None``: it draws from the user's
        global RNG as it was at entry, exactly as Pyro's estimator would.
        """
        particles = None if self.mesh.rank == 0 else stream_seed(key, "particles", self.mesh.rank)
        return particles, stream_seed(key, "subsample", self.mesh.data_index)

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
        backward pass of the local surrogate. A rank without particles
        (``self._call.empty``) must contribute no rows and no gradient.

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
            if self._compiled is not None:
                return self._compiled(kind, method, super().differentiable_loss, model, guide, args, kwargs,
                                      extra=(self.num_particles,))[0]
            if self._linear:
                return method(model, guide, *args, **kwargs)
            loss, result = self._combine(kind, method(model, guide, *args, **kwargs))
            return result if kind == "differentiable_loss" else loss
        entry = get_global_state()
        key = draw_key()  # the call's key; rank 0's particles start from ``entry``, as in Pyro
        self._call = call = _CallShare(*self.mesh.particle_share(self.num_particles))
        try:
            with explained(f"{type(self).__name__}.{kind}"):
                return self._sharded_call(kind, method, model, guide, args, kwargs, key, entry)
        except BaseException:
            if call.stash is not None:  # the one place a failed call gives back the gradients held before it
                self._restore_grads(call.stash, call.params, reduced=None)
            raise
        finally:
            self._call = None
            reseed_global(key)  # every rank leaves with the same global RNG state

    def _local_run(self, kind, method, model, guide, args, kwargs, particle_seed, subsample_seed, entry,
                   first: bool = True):
        """This rank's share of the call: ``(payload, params by name, leaves, local gradients)``."""
        mesh, call = self.mesh, self._call
        if kind == "loss_and_grads":
            call.stash = self._stash_grads(model, guide)
        if particle_seed is None:  # Pyro's own stream, from the state at entry
            set_global_state(entry)
            rng = contextlib.nullcontext()
        else:
            rng = RNGStream(particle_seed)
        messenger = ShardParticlesMessenger(
            call.lo, call.hi, self.num_particles, subsample_rng=RNGStream(subsample_seed),
            shared_subsample=mesh.sample > 1,
        )
        self._share = messenger.lo, messenger.hi
        try:
            with rng, messenger, poutine.trace(param_only=True) as capture:
                if self._compiled is None:
                    payload = method(model, guide, *args, **kwargs)
                else:
                    streams = {"subsample": messenger.subsample_rng} if messenger.shared_subsample else {}
                    payload, _ = self._compiled(
                        kind, method, super().differentiable_loss, model, guide, args, kwargs,
                        extra=(self.num_particles, call.lo, call.hi, mesh.sample, mesh.data),
                        streams=streams, accumulate=False, capture=first)
        finally:
            self._share = None
        params = _collect_params(capture.trace, model, guide, self._is_local_param)
        call.params = list(params.values())
        leaves, grads = [], None
        if kind == "differentiable_loss" and getattr(payload, "requires_grad", False):
            leaves = _graph_leaves(payload, [params[n] for n in sorted(params)])
            if self._linear:  # the local backward, inside the guard
                grads = torch.autograd.grad(payload, leaves, allow_unused=True)
        return payload, params, leaves, grads

    def _sharded_call(self, kind, method, model, guide, args, kwargs, key, entry):
        mesh, call = self.mesh, self._call
        call.gathered = mesh.sample == 1  # no gather over the sample axis to wait in
        what = f"{type(self).__name__}.{kind}"
        fingerprint = data_fingerprint(args, kwargs, extra=(key,), device=mesh.device)
        particle_seed, subsample_seed = self._stream_seeds(key)
        local_state = self._local_state()
        differentiable = kind == "differentiable_loss"

        def layout(run):
            params = {} if run is None else run[1]
            names = sorted(params)
            out = {
                "num_particles": self.num_particles,
                "mesh": (mesh.sample, mesh.data),
                "params": {n: tuple(params[n].shape) for n in names},
                "unsynchronised": [n for n in names if not self._is_synced(params[n])],  # all agree to broadcast
            }
            if differentiable:  # tensors the result is differentiated by (params first)
                out["leaves"] = [] if run is None else [tuple(t.shape) for t in run[2]]
            return out

        # Rank 0 is the source of every broadcast: its values never change, so its
        # first run is always its result. The others run again after a broadcast.
        agreement = Agreement(fingerprint, slot=mesh.data_index, slots=mesh.data, describe=lambda: {
            "random key of the call (drawn from the global torch RNG)": key,
            **describe_data(args, kwargs),
        })
        run = None
        for first in (True, False):
            rerun = first or mesh.rank != 0  # rank 0 keeps its first run and joins the others' check
            previous = run
            run, total = guarded(
                (lambda: self._local_run(kind, method, model, guide, args, kwargs, particle_seed, subsample_seed,
                                         entry, first)) if rerun else (lambda: previous),
                group=self._world, what=what, device=mesh.device,
                value=lambda r: 0.0 if not self._linear or call.empty else _as_float(r[0]),
                layout=layout, hint=_SHAPE_HINT if self.vectorize_particles else "",
                agree=agreement,
            )
            payload, params, leaves, grads = run
            fresh = layout(run)["unsynchronised"]
            if not fresh:
                break
            # After a broadcast the second pass sees no fresh parameter (or the check fails
            # on every rank): rank 0 reuses its run, the others run again from the
            # per-rank state the call started with.
            self._broadcast_new([params[n] for n in fresh], model, guide)
            if mesh.rank != 0:
                self._restore_local_state(local_state)
                if call.stash is not None:
                    self._restore_grads(call.stash, call.params, reduced=None)
                    call.stash = None
        ordered = [params[n] for n in sorted(params)]
        self._last_params = ordered
        # After the check, a local failure (the backward pass of a nonlinear estimator,
        # out of memory, say) rides as a flag in the collectives every rank makes next,
        # so every rank raises at once; a failure before the particles' gather, which the
        # other ranks are already waiting in, stops them by aborting (pyro_sp.distributed.failure).
        error = None
        if self._linear:
            global_loss, result = total / mesh.data, payload
        else:
            try:
                group_loss, result = self._combine(kind, payload)
            except Exception as e:  # noqa: BLE001 - raised on every rank below
                if not call.gathered:
                    abort_everywhere(e, what)
                    raise
                error, group_loss, result = e, 0.0, None
            global_loss = self._data_mean(group_loss, error, what)
        if kind == "loss":
            if error is not None:  # no collective follows: no rank waits for this one
                raise error
            return global_loss
        if kind == "loss_and_grads":
            grads = [None] * len(ordered) if call.empty else [p.grad for p in ordered]
            reduced = all_reduce_gradients(ordered, grads, group=self._world, scale=1.0 / mesh.data,
                                           error=error, what=what)
            stash, call.stash = call.stash, None
            self._restore_grads(stash, ordered, reduced=reduced)
            return global_loss
        if error is None and not isinstance(result, torch.Tensor):  # e.g. an empty model: Pyro returns a float
            return global_loss
        if error is None and not leaves:
            return torch.full_like(result.detach(), global_loss)
        if error is None and grads is None:  # a nonlinear estimator's surrogate, formed after the gather
            try:
                grads = torch.autograd.grad(result, leaves, allow_unused=True)
            except Exception as e:  # noqa: BLE001 - raised on every rank by the reduction
                error = e
        if call.empty or error is not None:  # a stand-in particle: its gradient is not part of the estimator
            grads = [None] * len(leaves)
        reduced = all_reduce_gradients(leaves, list(grads), group=self._world, scale=1.0 / mesh.data,
                                       error=error, what=what)
        value = torch.full_like(result.detach(), global_loss)
        return _ReducedGradient.apply(value, reduced, *leaves)

    def _gather_particles(self, tensor: torch.Tensor) -> torch.Tensor:
        """
        All ``num_particles`` rows of a per-particle tensor, gathered over the
        sample axis (a rank without particles passes zero rows).
        """
        if not self.mesh.is_distributed or self.mesh.sample == 1:
            return tensor
        counts = share_counts(self.num_particles, self.mesh.sample)
        out = gather_rows([tensor], counts, group=self.mesh.get_group("sample"))[0]
        if self._call is not None:
            self._call.gathered = True
        return out

    def _data_mean(self, group_loss: float, error: BaseException | None = None, what: str = "") -> float:
        """
        Average a per-data-group loss (equal on the ranks of a sample group) over the
        data axis; a flag says whether a rank failed (``error``), and then every rank raises.
        """
        if self.mesh.data == 1:
            return group_loss
        loss, failed = all_reduce_sum([group_loss / self.mesh.world_size, float(error is not None)],
                                      group=self._world, device=self.mesh.device, kind="data_mean")
        if failed:
            raise_failure(error, what, "", self._world, self.mesh.world_size)
        return loss

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


class _ReducedGradient(torch.autograd.Function):
    r"""
    The global loss as a tensor whose gradient with respect to ``leaves`` is
    the reduced gradient :math:`g` (computed in the call): ``backward`` gives
    ``grad_output * g`` to each leaf, so ``loss.backward()`` and
    ``torch.autograd.grad(loss, leaves)`` both see the estimator's gradient,
    and the user's backward needs no collective. First derivatives only.
    """

    @staticmethod
    def forward(ctx, value, grads, *leaves):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, *(None if g is None else grad_output * g for g in ctx.grads))


class _CallShare:
    """This rank's particles ``[lo, hi)`` during one call; ``empty`` when it holds none."""

    __slots__ = ("lo", "hi", "empty", "gathered", "stash", "params")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi, self.empty = lo, hi, lo == hi
        self.gathered = False  # whether the particles' gather over the sample axis is done
        self.stash = None  # loss_and_grads: the gradients held before the call, given back once
        self.params: list = []  # the parameters the last local run used


_SHAPE_HINT = (
    "If the failure is a shape error, check that the model and guide broadcast over a leftmost "
    "particle dimension (vectorize_particles=True needs static, vectorizable structure)."
)


def _graph_leaves(tensor: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """
    The leaf tensors that ``tensor`` can be differentiated by: ``params`` (in
    their order) that it uses, then any other leaf requiring grad (e.g. a
    tensor closed over by the model), in the order a depth-first walk of the
    autograd graph finds them.
    """
    found: dict[int, torch.Tensor] = {}
    seen: set = set()
    stack = [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            found.setdefault(id(variable), variable)
        stack.extend(reversed([n for n, _ in node.next_functions]))
    ordered = [p for p in params if id(p) in found]
    known = {id(p) for p in ordered}
    return ordered + [t for i, t in found.items() if i not in known]


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
