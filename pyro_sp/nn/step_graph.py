# SPDX-License-Identifier: Apache-2.0
r"""
A training step captured as one CUDA graph and replayed (``MeanFieldVI(cuda_graphs=True)``).

The step's device work (the compiled loss and its backward, the gradients, a capturable
optimizer's update) is recorded once and replayed with one launch, so the host neither
launches its kernels one by one nor waits between them. A replay computes exactly what
running the step does:

- **The same kernels.** The step ran once with the same *key* before it is captured
  (compiling and autotuning happen there), and the capture records those kernels.
- **The same noise.** Random ops in a graph read the CUDA generator's seed and offset
  when the graph is *replayed*; the generator is seeded with the step's stream seed
  :math:`s_t` before each replay (and given back after it), so step :math:`t` draws from
  Philox :math:`(s_t, 0)`, as the step run without a graph does.
- **The same memory and settings.** A graph reads and writes fixed addresses and holds
  the values the host passed its kernels at capture. The inputs are copied into its
  buffers; the owner's key holds the address of every parameter, of every gradient the
  step reads (the optimizer's too) and of every optimizer state tensor; the optimizer's
  hyperparameters (by value, except a CUDA tensor, which the kernels read and is kept by
  identity: a float learning rate set anew is a new key, a CUDA tensor one updated in
  place is not); the inputs' shapes, strides, dtypes and devices; the modules' training
  flags; torch's fp32 matmul and cuDNN TF32 settings and autocast; the estimator's
  settings. A new key runs the step without a graph once, and is captured the next
  time it comes (other keys may come in between).
- **Gradients given, not added.** A step that starts from zero gradients (an optimizer
  step) does not zero ``.grad`` and add into it: the graph's own gradient tensors are
  put in ``.grad`` after each replay, and every replay writes them again, as the whole-
  network example of PyTorch's CUDA-graph notes does: a zeroing and an addition saved,
  four passes over the gradients.

The graphs of one owner share one memory pool (they replay one at a time), and at most
:data:`CAPACITY` are kept, the least recently used dropped first.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["CAPACITY", "StepGraphs", "capturable", "seeded"]

#: The most graphs one owner keeps (a step whose last batch is smaller needs two).
CAPACITY = 2
#: The most keys one owner remembers having run without a graph (captured when seen again).
SEEN = 16


def capturable(optimizer) -> bool:
    """Whether ``optimizer.step()`` can be recorded in a CUDA graph: a ``torch.optim.Optimizer``
    whose every parameter group has ``capturable=True`` (its step count kept on the device)."""
    return isinstance(optimizer, torch.optim.Optimizer) and all(
        g.get("capturable", False) for g in optimizer.param_groups)


def _value(v):
    """A hyperparameter as a key entry: a CUDA tensor by identity and address (updated in place, it
    is read by the replay), anything else by value (a CPU tensor too: the optimizers read it on the
    host, so a graph holds the value it had at capture)."""
    if isinstance(v, torch.Tensor):
        if v.is_cuda:
            return ("tensor", id(v), v.data_ptr())
        return ("value", tuple(v.shape), tuple(v.reshape(-1).tolist()))
    if isinstance(v, (list, tuple)):
        return tuple(map(_value, v))
    return v


def optimizer_key(optimizer, given: frozenset = frozenset()) -> tuple:
    """The optimizer's part of a step's key: its identity, each group's hyperparameters (in the
    group's order), the address of each of its parameters and of their gradients (its update
    and zeroing read and write every one, the owner's or not; a missing gradient is skipped, and
    so is the gradient of a parameter whose ``id`` is in ``given``: the step itself gives it),
    and the address of each state tensor. Cheap: it is built on the host before every step."""
    if optimizer is None:
        return ()
    groups = tuple((tuple((id(p), p.data_ptr(), None if p.grad is None or id(p) in given else p.grad.data_ptr())
                          for p in g["params"]),
                    tuple(_value(v) for k, v in g.items() if k != "params"))
                   for g in optimizer.param_groups)
    state = tuple(v.data_ptr() if isinstance(v, torch.Tensor) else v
                  for s in optimizer.state.values() for v in s.values())
    return (id(optimizer), groups, tuple(map(id, optimizer.state)), state)


def tensors_key(tensors, addresses: bool = True) -> tuple:
    """Shapes, dtypes, devices and (``addresses=True``) addresses of ``tensors`` (``None`` kept as
    ``None``); the inputs are copied into a graph's buffers, so only their layout (with their
    strides, which the compiled code is specialised to) is part of a key."""
    if not addresses:
        return tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in tensors)
    return tuple(None if t is None else (t.shape, t.dtype, t.device, t.data_ptr()) for t in tensors)


@contextlib.contextmanager
def seeded(device: torch.device, seed: int):
    """The device's default CUDA generator at ``(seed, offset 0)`` inside the block, its own
    state given back after it (what a graph replayed inside reads)."""
    generator = torch.cuda.default_generators[device.index if device.index is not None
                                              else torch.cuda.current_device()]
    saved = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(saved)


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    gives: object


class StepGraphs:
    """
    The captured steps of one owner, by key.

    :param str owner: how errors name the owner (``"MeanFieldVI"``).
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._entries: OrderedDict = OrderedDict()
        self._seen: OrderedDict = OrderedDict()  # keys run without a graph, the latest last
        self._pool = None
        self._stream: torch.cuda.Stream | None = None
        self.captures = 0  #: graphs captured so far
        self.replays = 0  #: steps replayed so far

    def run(self, key: tuple, body: Callable[..., tuple], inputs: tuple[torch.Tensor, ...], seed: int,
            eager_rng: Callable[[], contextlib.AbstractContextManager]) -> tuple[torch.Tensor, object]:
        """
        One step: ``body(*inputs)`` returns the step's 0-d loss and what it *gives* (for
        ``MeanFieldVI``, the gradients it leaves in ``.grad``, with their parameters), and does the
        rest of its work on the device without reading any value on the host.

        A key seen for the first time runs ``body`` now inside ``eager_rng()`` (the step's
        random stream, installed as it is without graphs); the next step with that key captures
        it, also when steps of other keys ran in between (two batch sizes taking turns are both
        captured; the last :data:`SEEN` keys are remembered); later ones replay it, the
        generator seeded with ``seed`` (the same stream).

        :returns: the step's loss, a tensor of its own, and what the step gives: from a replay,
            what the capture gave, whose tensors every replay writes again (kept alive with the
            graph; the owner puts them back where the step would have left them).
        """
        entry = self._entries.get(key)
        if entry is None and key not in self._seen:
            with eager_rng():
                loss, gives = body(*inputs)
            self._seen[key] = None  # ran (compiled, autotuned): captured the next time it comes
            while len(self._seen) > SEEN:
                self._seen.popitem(last=False)
            return loss.detach(), gives
        device = inputs[0].device
        if entry is None:
            entry = self._capture(key, body, inputs)
        else:
            self._entries.move_to_end(key)
        for buffer, value in zip(entry.inputs, inputs):
            if buffer is not value:
                buffer.copy_(value)
        with seeded(device, seed):
            entry.graph.replay()
        self.replays += 1
        return entry.output.clone(), entry.gives

    def _capture(self, key, body, inputs) -> _Entry:
        device = inputs[0].device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device=device)
        while len(self._entries) >= CAPACITY:
            self._entries.popitem(last=False)
        buffers = tuple(torch.empty_like(t) for t in inputs)
        graph = torch.cuda.CUDAGraph()
        self._stream.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
                output, gives = body(*buffers)
                output = output.detach()
        except Exception as e:
            raise RuntimeError(
                f"{self.owner} could not capture its step as a CUDA graph: {type(e).__name__}: {e}. The step "
                "was not taken (a capture runs nothing). A graph needs a step that never reads a device value "
                f"on the host and never leaves the device. Pass {self.owner}(..., cuda_graphs=False)."
            ) from e
        torch.cuda.current_stream(device).wait_stream(self._stream)
        self._entries[key] = entry = _Entry(graph, buffers, output, gives)
        self.captures += 1
        return entry
