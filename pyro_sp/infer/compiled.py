# SPDX-License-Identifier: Apache-2.0
r"""
The compiled step: a static Pyro program captured once as a graph of tensor
operations, then run by ``torch.compile``.

**Capture.** The estimator's ``differentiable_loss`` and
:func:`torch.autograd.grad` run once under :func:`~torch.fx.experimental.proxy_tensor.make_fx`
on real tensors. The parameters (the param store's unconstrained tensors, the
model's and guide's module parameters), their buffers and the tensor arguments are
the graph's inputs: the program finds them where it always does, and the tracer
knows them by identity. The result is one graph

.. math::

    (\theta, x, \varepsilon) \mapsto \big(\hat{\mathcal{L}}, \nabla_\theta \hat{\mathcal{L}}\big)

holding forward and backward, with Pyro's Python (handlers, traces, the ELBO's
bookkeeping) gone. The capturing call's own result is the eager result.

**Noise.** The random operations :math:`\varepsilon` and whatever they depend on
are split off into a small graph that runs eagerly, in the program's order, each
in the random stream that was installed when it was captured (the rank's particle
stream, a sample group's subsample stream). So a compiled call draws exactly the
numbers of the eager call from the same generators and leaves them in the same
state: :func:`pyro.set_rng_seed` reproduces it, and pinned test noise pins it.
The rest is compiled.

**Static.** Each value the program reads in Python (``.item()``, ``if tensor:``,
``float(t)``: torch's argument validation, TraceEnum's check for zero
probabilities) is a *guard*: the graph recomputes it, and a call in which it
differs from the captured value is thrown away and run eagerly, from the same
random state. So a branch is never silently baked in; a program whose reads change
:data:`MAX_GUARD_FAILURES` times runs eagerly from then on, with a
:class:`CompileFallbackWarning` naming the place. Pyro's NaN warnings are not
guards (the compiled call checks its loss for NaN as Pyro does). The capture is
refused, and the call runs eagerly with a warning, when the program

- uses an operation whose output shape depends on values (``nonzero``,
  boolean masks);
- makes the loss depend on a tensor that requires grad but is neither a Pyro
  parameter nor a parameter of the model or guide module;
- gets an argument that is neither a tensor nor a hashable value.

A captured graph is keyed by the call (``loss``, ``loss_and_grads``,
``differentiable_loss``), the shapes, dtypes and devices of the tensor
arguments, the values of the other arguments, and the identity and shape of
every parameter and buffer: a new shape, a new or replaced parameter is a new
key, run eagerly once (where the distributed estimator discovers and broadcasts
new parameters) and captured on its next call. What cannot be checked is
Python state the program reads outside its arguments (a global counter, a
Python random number): a static program is one whose tensor operations depend
only on the key.
"""

from __future__ import annotations

import contextlib
import importlib
import numbers
import os
import sys
import warnings
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pyro_sp.distributed.streams import active_stream, get_global_state, set_global_state

__all__ = ["CompileFallbackWarning", "CompiledCalls", "MAX_GRAPHS"]

#: Captured graphs kept per estimator; further keys run eagerly (with a warning).
MAX_GRAPHS = 8

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_DISTRIBUTIONS_DIR = os.path.join(_TORCH_DIR, "distributions") + os.sep
_PYRO_DIR = os.path.dirname(pyro.__file__) + os.sep

#: Python reads of tensor values that only warn, left out of the graph (the compiled call
#: checks its loss for NaN as Pyro does): (package, file below it, function).
_BENIGN_READS = {
    ("pyro", "util.py", "warn_if_nan"),
    ("pyro", "util.py", "warn_if_inf"),
    ("pyro", "util.py", "torch_isnan"),
    ("pyro", "util.py", "torch_isinf"),
}
#: Failed guards after which a captured program is dropped and its key runs eagerly.
MAX_GUARD_FAILURES = 3


#: Pyro modules whose ``torch_item`` turns a loss into a Python number that the loss is then
#: computed with (``loss + (surrogate - torch_item(surrogate))``): captured as a detached tensor.
_ITEM_MODULES = ("pyro.infer.trace_elbo", "pyro.infer.trace_mean_field_elbo")


class CompileFallbackWarning(UserWarning):
    """A compiled estimator ran a call eagerly: the program is not static, or did not compile."""


class NotStatic(Exception):
    """Why a program cannot be captured (the message names the place)."""


class CompiledCalls:
    r"""
    The compiled calls of one estimator: a cache of captured programs by key.

    :param backend: a :func:`torch.compile` backend (``"inductor"``, ``"aot_eager"``, …), or
        ``"graph"``: the captured graph run as Python code, without a compiler.
    :param bool cuda_graphs: replay the compiled graph as a CUDA graph
        (inductor's ``mode="reduce-overhead"``).
    :param str owner: the estimator's name, for warnings.
    :param bool speak: whether this process warns (rank 0).
    """

    def __init__(self, backend: str, cuda_graphs: bool, owner: str, speak: bool = True) -> None:
        self.backend, self.cuda_graphs, self.owner, self.speak = backend, cuda_graphs, owner, speak
        self._programs: dict = {}  # key -> _Program | "seen" | "eager"
        self._full_warned = False
        self.captures = 0  # how many graphs were captured (a new shape or parameter adds one)

    def __call__(self, kind: str, method: Callable, differentiable: Callable, model, guide, args, kwargs, *,
                 extra=(), streams: dict | None = None, accumulate: bool = True, capture: bool = True):
        """
        One call: compiled when its key was captured, captured when the key was seen
        before, else ``method`` (Pyro's estimator, eagerly).

        :param str kind: ``"loss"``, ``"loss_and_grads"`` or ``"differentiable_loss"``.
        :param method: the eager call, ``method(model, guide, *args, **kwargs)``.
        :param differentiable: the Pyro family's ``differentiable_loss`` (what is captured).
        :param extra: more of the key (the estimator's particle share).
        :param dict streams: ``{"subsample": RNGStream}`` where the call draws subsample
            indices from a stream of their own.
        :param bool accumulate: ``loss_and_grads`` adds to ``.grad`` (Pyro's
            semantics); else it sets ``.grad`` (the distributed call, which stashed
            the earlier gradients).
        :param bool capture: whether this call may be captured (not a distributed call's
            second setup round, so every rank captures at the same call).
        :returns: ``(payload, program)``: Pyro's return value, and the captured
            :class:`_Program` that ran or was captured (``None`` for an eager call).
        """
        streams = streams or {}
        try:
            key = _key(kind, model, guide, args, kwargs, extra)
        except NotStatic as e:
            self._warn(f"{e} Running it eagerly.")
            return method(model, guide, *args, **kwargs), None
        entry = self._programs.get(key)
        if isinstance(entry, _Program):
            return self._run(entry, key, kind, method, model, guide, args, kwargs, streams, accumulate)
        if entry == "seen" and capture:
            if sum(isinstance(v, _Program) for v in self._programs.values()) >= MAX_GRAPHS:
                if not self._full_warned:
                    self._full_warned = True
                    self._warn(f"{MAX_GRAPHS} graphs are captured already (one per shape, argument value "
                               "and parameter set); new keys run eagerly. Pass changing numbers as tensors.")
                self._programs[key] = "eager"
            else:
                captured = self._capture(key, kind, differentiable, model, guide, args, kwargs, streams, accumulate)
                if captured is not None:
                    return captured
                return method(model, guide, *args, **kwargs), None
        if entry is None or entry == "seen":
            payload = method(model, guide, *args, **kwargs)
            try:  # the key after the call: the parameters it created belong to it
                self._programs.setdefault(_key(kind, model, guide, args, kwargs, extra), "seen")
            except NotStatic:
                pass
            return payload, None
        return method(model, guide, *args, **kwargs), None

    # ---- capture ----------------------------------------------------------------
    def _capture(self, key, kind, differentiable, model, guide, args, kwargs, streams, accumulate):
        state = _state_tensors(model, guide)
        data, spec = tree_flatten((args, kwargs))
        data_tensors = [i for i, leaf in enumerate(data) if isinstance(leaf, torch.Tensor)]
        inputs = [t for _, t in state] + [data[i] for i in data_tensors]
        targets = [t for _, t in state if t.requires_grad and t.is_leaf]
        check = _StaticCheck(streams.get("subsample"))
        result = {}

        def program(*flat):
            with check, torch.enable_grad(), poutine.trace(param_only=True) as sites:
                loss = differentiable(model, guide, *args, **kwargs)
                if not isinstance(loss, torch.Tensor):
                    raise NotStatic(f"Expected the loss as a tensor, got {type(loss).__name__} (an empty model?).")
                grads = ()
                if kind != "loss" and loss.requires_grad and targets:
                    check.extra = _extra_leaves(loss, targets)
                    grads = torch.autograd.grad(loss, targets, allow_unused=True)
            result["loss"], result["grads"] = loss.detach(), grads
            result["sites"] = [n for n, site in sites.trace.nodes.items() if site["type"] == "param"]
            # every value the program read, compared with what it read now: the guards
            guards = torch.stack([_same(t, v) for t, v, _ in check.guards]) if check.guards else None
            return loss.detach(), tuple(grads), guards

        rng = get_global_state(), {n: s.get_state() for n, s in streams.items()}
        try:
            with _traceable_items():
                gm = make_fx(program)(*inputs)
            check.verdict()
            prog = _Program(gm, check.roles, kind, state, data_tensors, targets, result["sites"],
                            [where for _, _, where in check.guards], self.backend, self.cuda_graphs)
        except Exception as e:  # noqa: BLE001 - not static or not traceable: the eager call is the answer
            self._programs[key] = "eager"
            reason = str(e) if isinstance(e, NotStatic) else f"Its capture failed: {type(e).__name__}: {e}"
            self._warn(f"The program is not static, so it runs eagerly. {reason}")
            _restore_rng(rng, streams)
            return None  # the caller runs the eager call
        self._programs[key] = prog
        self.captures += 1
        return _apply(kind, result["loss"], result["grads"], targets, accumulate), prog

    # ---- compiled call ------------------------------------------------------------
    def _run(self, prog, key, kind, method, model, guide, args, kwargs, streams, accumulate):
        first = not prog.ran
        rng = (get_global_state(), {n: s.get_state() for n, s in streams.items()}) if first or prog.guards else None
        try:
            loss, grads, ok = prog(args, kwargs, streams)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001
            if not first:
                raise
            # the first run compiles: a failure there is the compiler's, and the eager call stands in
            self._programs[key] = "eager"
            self._warn(f"Its graph did not compile, so it runs eagerly: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}")
            _restore_rng(rng, streams)
            return method(model, guide, *args, **kwargs), None
        if ok is not None and not bool(ok.all()):
            # A value the program read differs from the captured one: this call takes another
            # path, so the eager call stands in (from the same random state).
            _restore_rng(rng, streams)
            prog.guard_failures += 1
            if prog.guard_failures >= MAX_GUARD_FAILURES:
                path, line, function = prog.guards[int((ok == 0).nonzero()[0])]
                self._programs[key] = "eager"
                self._warn(f"The program is not static, so it runs eagerly: the value it reads at {path}:{line} "
                           f"({function}), e.g. by `.item()`, `if tensor:` or `float(tensor)`, changed in "
                           f"{prog.guard_failures} calls. Keep such decisions in tensors (torch.where) or pass "
                           "them as arguments.")
            return method(model, guide, *args, **kwargs), None
        pyro.util.warn_if_nan(loss, "loss")
        return _apply(kind, loss, grads, prog.targets, accumulate), prog

    def _warn(self, message: str) -> None:
        if self.speak:
            warnings.warn(f"{self.owner}(compile=...): {message}", CompileFallbackWarning, stacklevel=4)


class _Program:
    """One captured program: its noise graph (eager) and its compiled graph."""

    def __init__(self, gm, roles, kind, state, data_tensors, targets, sites, guards, backend, cuda_graphs) -> None:
        self.kind, self.state, self.data_tensors, self.targets = kind, state, data_tensors, targets
        self.sites = sites  # the param sites the program visits, in order
        self.guards = guards  # where each value it reads was read (the graph checks each)
        self.guard_failures = 0
        self.ran = False
        self.noise, main = _split_noise(gm, roles)
        self.nodes = len(gm.graph.nodes)
        if backend == "graph":  # the captured graph as Python, no compiler
            self.main = main
        else:
            self.main = torch.compile(main, backend=backend, fullgraph=True, dynamic=False,
                                      mode="reduce-overhead" if cuda_graphs else None)
        self.cuda_graphs = cuda_graphs

    def __call__(self, args, kwargs, streams):
        with torch.no_grad():
            # The param sites, as the eager program visits them, for the handlers around the
            # call: SVI steps the parameters its trace saw, the distributed call checks them.
            for name in self.sites:
                pyro.param(name)
        data, _ = tree_flatten((args, kwargs))
        inputs = [t for _, t in self.state] + [data[i] for i in self.data_tensors]
        with torch.no_grad():
            noise = self.noise(inputs, streams)
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            loss, grads, ok = self.main(*inputs, *noise)
            if self.cuda_graphs:  # the graph's outputs are overwritten by the next replay
                loss = loss.clone()
                grads = tuple(None if g is None else g.clone() for g in grads)
                ok = None if ok is None else ok.clone()
        self.ran = True
        return loss, grads, ok


# ---- the key ---------------------------------------------------------------------
def _modules(model, guide):
    for fn in (model, guide):
        owner = getattr(fn, "__self__", None)  # a bound method of a module (Pyro's VAE tutorial)
        for m in (fn, owner):
            if isinstance(m, torch.nn.Module):
                yield m


def _state_tensors(model, guide) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer the program can read: the param store's, then the modules'."""
    out, seen = [], set()
    for name, t in pyro.get_param_store().named_parameters():
        if id(t) not in seen:
            seen.add(id(t))
            out.append((f"param:{name}", t))
    for i, m in enumerate(_modules(model, guide)):
        for kind, named in (("parameter", m.named_parameters()), ("buffer", m.named_buffers())):
            for name, t in named:
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append((f"module{i}.{kind}:{name}", t))
    return out


def _key(kind, model, guide, args, kwargs, extra) -> tuple:
    leaves, spec = tree_flatten((args, kwargs))
    data = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            data.append(("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad))
        else:
            try:
                hash(leaf)
            except TypeError:
                raise NotStatic(
                    f"Argument leaf {i} is a {type(leaf).__name__}, which is neither a tensor nor hashable, "
                    "so no graph can be keyed by it. Pass tensors (or numbers, strings, None)."
                ) from None
            data.append(("value", type(leaf), leaf))
    state = tuple((n, id(t), tuple(t.shape), t.dtype, t.requires_grad) for n, t in _state_tensors(model, guide))
    return (kind, id(model), id(guide), repr(spec), tuple(data), state, tuple(extra),
            pyro.infer.util.is_validation_enabled())


# ---- the static check ------------------------------------------------------------------
def _caller() -> tuple[str, int, str]:
    """The innermost frame outside torch (``torch.distributions`` counts as outside) and this file."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        inside_torch = path.startswith(_TORCH_DIR) and not path.startswith(_DISTRIBUTIONS_DIR)
        if not inside_torch and path != __file__:
            return path, frame.f_lineno, frame.f_code.co_name
        frame = frame.f_back
    return "<unknown>", 0, "<unknown>"


def _benign(where) -> bool:
    path, _, function = where
    for package, tail, name in _BENIGN_READS:
        root = _PYRO_DIR if package == "pyro" else _TORCH_DIR
        if function == name and path == os.path.join(root, tail):
            return True
    return False


class _StaticCheck(TorchDispatchMode):
    """
    Sits above the tracer: records each value the program reads in Python (a guard:
    the graph recomputes it and the call checks it), refuses value-dependent shapes,
    and notes, for each random operation, the random stream it draws from.
    """

    def __init__(self, subsample_stream=None) -> None:
        super().__init__()
        self.subsample_stream = subsample_stream
        self.guards: list = []  # (tensor read, the value read, where)
        self.dynamic: list = []
        self.roles: list[str | None] = []
        self.extra: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tags = func.tags
        if func is torch.ops.aten._local_scalar_dense.default or torch.Tag.data_dependent_output in tags:
            where = _caller()
            with disable_proxy_modes_tracing():  # a value for Python, no node in the graph
                value = func(*args, **kwargs)
            if not _benign(where) and func is torch.ops.aten._local_scalar_dense.default:
                self.guards.append((args[0], value, where))
            elif not _benign(where):
                self.dynamic.append((func, where))
            return value
        if torch.Tag.dynamic_output_shape in tags and not _integer_indexing(func, args):
            self.dynamic.append((func, _caller()))
        if torch.Tag.nondeterministic_seeded in tags:
            stream = active_stream()
            self.roles.append("subsample" if stream is not None and stream is self.subsample_stream else None)
        return func(*args, **kwargs)

    def verdict(self) -> None:
        """Raise :class:`NotStatic` naming the first place that makes the program not static."""
        if self.dynamic:
            func, (path, line, function) = self.dynamic[0]
            raise NotStatic(
                f"{func} at {path}:{line} ({function}) makes a shape that depends on values "
                "(e.g. nonzero, a boolean mask). Use fixed shapes (masks multiplied in, torch.where)."
            )
        if self.extra:
            shapes = ", ".join(str(tuple(t.shape)) for t in self.extra[:3])
            raise NotStatic(
                f"The loss depends on {len(self.extra)} tensor(s) that require grad but are neither Pyro "
                f"parameters nor module parameters of the model or guide (shapes {shapes}). Register them "
                "with pyro.param or pyro.module, or detach them."
            )


def _same(t: torch.Tensor, value) -> torch.Tensor:
    """In the graph: whether ``t`` holds ``value`` again (as an int32 0/1; booleans compared as integers)."""
    t = t.reshape(())
    if t.dtype == torch.bool:
        t, value = t.to(torch.int32), int(value)
    return torch.eq(t, value).to(torch.int32)


def _integer_indexing(func, args) -> bool:
    """``x[i]`` with integer index tensors: its shape is the indices' (a boolean mask's is not)."""
    if func is not torch.ops.aten.index.Tensor:
        return False
    return all(i is None or not (i.dtype == torch.bool or i.dtype == torch.uint8) for i in args[1])


def _extra_leaves(loss: torch.Tensor, targets: list[torch.Tensor]) -> list[torch.Tensor]:
    from pyro_sp.infer.distributed_elbo import _graph_leaves  # the one walk of an autograd graph

    known = {id(t) for t in targets}
    return [t for t in _graph_leaves(loss, []) if id(t) not in known]


def _detached_item(x):
    """``torch_item`` inside a capture: the same number, as a detached tensor the graph can carry."""
    return x if isinstance(x, numbers.Number) else x.detach()


@contextlib.contextmanager
def _traceable_items():
    modules = [importlib.import_module(m) for m in _ITEM_MODULES]
    saved = [m.torch_item for m in modules]
    try:
        for m in modules:
            m.torch_item = _detached_item
        yield
    finally:
        for m, f in zip(modules, saved):
            m.torch_item = f


# ---- the noise graph ---------------------------------------------------------------
def _split_noise(gm: torch.fx.GraphModule, roles: list) -> tuple:
    """
    Split ``gm`` into the noise program (random operations and their ancestors, in
    order, each with its stream) and the rest. Returns ``(noise program, main
    GraphModule)``; the main graph takes the inputs, then the noise results it uses.
    """
    graph = gm.graph
    nodes = list(graph.nodes)
    random = [n for n in nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
              and torch.Tag.nondeterministic_seeded in n.target.tags]
    if len(random) != len(roles):
        raise NotStatic(f"Internal: {len(roles)} random operations were seen and {len(random)} traced.")
    role_of = dict(zip(random, roles))
    ancestors: set = set()
    stack = list(random)
    while stack:
        n = stack.pop()
        if n in ancestors or n.op == "placeholder":
            continue
        ancestors.add(n)
        stack.extend(n.all_input_nodes)
    noise = [n for n in nodes if n in ancestors]
    # noise results the rest of the graph reads
    used = [n for n in noise if any(u not in ancestors for u in n.users)]
    placeholders = [n for n in nodes if n.op == "placeholder"]

    main = torch.fx.Graph()
    env = {}
    for p in placeholders:
        env[p] = main.placeholder(p.name)
    for n in used:
        env[n] = main.placeholder(f"noise_{n.name}")
    for n in nodes:
        if n.op == "placeholder" or n in ancestors:
            continue
        env[n] = main.node_copy(n, lambda a: env[a])
    main.eliminate_dead_code()
    main_gm = torch.fx.GraphModule(gm, main)
    steps = [(n, role_of.get(n)) for n in noise]
    index = {p: i for i, p in enumerate(placeholders)}
    return _NoiseProgram(gm, steps, index, used), main_gm


class _NoiseProgram:
    """The random operations and their ancestors, run eagerly in their traced order."""

    def __init__(self, gm, steps, index, used) -> None:
        self.gm, self.index, self.used = gm, index, used
        self.steps = [(n, n.target if n.op == "call_function" else None, role) for n, role in steps]
        for n, target, _ in self.steps:
            if n.op not in ("call_function", "get_attr"):
                raise NotStatic(f"Internal: a {n.op} node ({n.name}) among the random operations.")

    def __call__(self, inputs, streams):
        env = {}

        def value(a):
            if isinstance(a, torch.fx.Node):
                return env[a] if a in env else inputs[self.index[a]]
            return a

        for n, target, role in self.steps:
            if n.op == "get_attr":
                env[n] = getattr(self.gm, n.target)
                continue
            args = torch.fx.node.map_aggregate(n.args, value)
            kwargs = torch.fx.node.map_aggregate(n.kwargs, value)
            if role is not None:
                with streams[role]:
                    env[n] = target(*args, **kwargs)
            else:
                env[n] = target(*args, **kwargs)
        return [env[n] for n in self.used]


# ---- results -----------------------------------------------------------------
def _apply(kind, loss, grads, targets, accumulate):
    """Pyro's return value of ``kind`` from a loss tensor and the gradients of ``targets``."""
    if kind == "loss":
        return float(loss)
    if kind == "loss_and_grads":
        for p, g in zip(targets, grads):
            if g is None:
                continue
            if accumulate and p.grad is not None:
                p.grad = p.grad + g
            else:
                p.grad = g
        return float(loss)
    from pyro_sp.infer.distributed_elbo import _ReducedGradient  # a value carrying its gradient

    if not torch.is_grad_enabled() or not grads:
        return loss
    used = [(p, g) for p, g in zip(targets, grads) if g is not None]
    return _ReducedGradient.apply(loss, [g for _, g in used], *[p for p, _ in used])


def _restore_rng(rng, streams) -> None:
    if rng is None:
        return
    state, stream_states = rng
    set_global_state(state)
    for name, s in stream_states.items():
        streams[name].set_state(s)
