# SPDX-License-Identifier: Apache-2.0
r"""
One optimizer step for all of a call's parameters: :class:`GroupedOptim`, a
drop-in for :class:`pyro.optim.PyroOptim` (``pyro.optim.Adam`` and its peers).

Pyro's wrapper makes one ``torch.optim`` optimizer *per parameter* and steps
them one after another. For an elementwise optimizer (Adam, AdamW, SGD, …) that
is the same arithmetic as one optimizer over all parameters, but it costs one
``Optimizer.step`` in Python per parameter, each launching its own kernels: on
a GPU, where a compiled ELBO step takes a few milliseconds, a dozen such steps
are a large part of it. :class:`GroupedOptim` keeps *one* torch optimizer whose
parameter groups hold every parameter seen so far (one group per distinct set
of hyperparameters) and steps a call's parameters in one ``step()``, so torch's
multi-tensor (``foreach``) or fused kernels cover all of them at once.

The update of each parameter is Pyro's: same hyperparameters (a dict, or a
callable of the parameter's name as Pyro takes it), same per-parameter gradient
clipping (``clip_args``), and only the parameters SVI passes are stepped (the
others' gradients are hidden from the step, as Pyro's per-parameter optimizers
never see them). :meth:`get_state` and :meth:`set_state` use Pyro's format
(``{param name: a one-parameter optimizer's state_dict}``), so checkpoints move
between ``pyro.optim.Adam`` and :func:`Adam` both ways.

Example::

    svi = SVI(model, guide, pyro_sp.optim.Adam({"lr": 1e-3}), loss=elbo)

Not offered: optimizers that change a parameter group's state in ``step``
(Pyro's ``ClippedAdam`` decays its group's learning rate), which a shared group
would change for parameters that did not take part in the call, and learning
rate schedulers (``pyro.optim.lr_scheduler``), which Pyro wraps per parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pyro
import torch
from pyro.optim.optim import PyroOptim

__all__ = ["Adam", "AdamW", "GroupedOptim", "SGD"]

#: torch optimizers whose ``step`` changes no group state: one group gives each parameter
#: exactly the update its own optimizer would.
ELEMENTWISE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adamax,
               torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad)


class GroupedOptim(PyroOptim):
    r"""
    :class:`pyro.optim.PyroOptim` with one torch optimizer for all parameters.

    :param optim_constructor: a ``torch.optim.Optimizer`` subclass of :data:`ELEMENTWISE`
        (``torch.optim.Adam``, ``AdamW``, ``SGD``, …).
    :param optim_args: its keyword arguments, or a callable of the parameter's name
        returning them (Pyro's two forms).
    :param clip_args: ``{"clip_norm": …, "clip_value": …}`` applied per parameter, or a
        callable returning it (Pyro's forms).
    :raises TypeError: for a constructor that is not one of :data:`ELEMENTWISE`.
    """

    def __init__(self, optim_constructor: type, optim_args: dict | Callable[..., dict],
                 clip_args: dict | Callable[..., dict] | None = None) -> None:
        if not (isinstance(optim_constructor, type) and issubclass(optim_constructor, ELEMENTWISE)):
            names = ", ".join(f"torch.optim.{c.__name__}" for c in ELEMENTWISE)
            raise TypeError(
                f"Expected an elementwise torch optimizer class ({names}), got {optim_constructor!r}. "
                "For other optimizers or learning-rate schedulers use Pyro's per-parameter "
                "pyro.optim.PyroOptim."
            )
        super().__init__(optim_constructor, optim_args, clip_args)
        # the one torch optimizer (not named "optimizer": Pyro takes an object with that attribute
        # for a learning-rate scheduler, pyro.optim.optim.is_scheduler)
        self.torch_optimizer: torch.optim.Optimizer | None = None
        self._groups: dict = {}  # hyperparameters -> index of their group

    def __call__(self, params: Iterable[torch.Tensor], *args, **kwargs) -> None:
        """Step ``params`` (SVI passes this call's parameters) in one ``step()``."""
        params = list(params)
        stepped = {id(p) for p in params}
        for p in params:
            if p not in self.optim_objs:
                self._add(p)
            clip = self.grad_clip[p]
            if clip is not None:
                clip(p)
        if self.torch_optimizer is None:
            return
        # Parameters not in this call keep their gradients out of the step (Pyro steps only these).
        hidden = [(p, p.grad) for group in self.torch_optimizer.param_groups for p in group["params"]
                  if p.grad is not None and id(p) not in stepped]
        for p, _ in hidden:
            p.grad = None
        try:
            self.torch_optimizer.step(*args, **kwargs)
        finally:
            for p, g in hidden:
                p.grad = g

    def _add(self, p: torch.Tensor) -> None:
        name = pyro.get_param_store().param_name(p)
        options = self._get_optim_args(p)
        state = None
        saved = self._state_waiting_to_be_consumed.pop(name, None)
        if saved is not None:
            # Pyro's per-parameter state: a one-parameter optimizer loads it (casting its tensors
            # as torch does), and its hyperparameters and state move into the shared optimizer.
            single = self.pt_optim_constructor([p], **options)
            single.load_state_dict(saved)
            options = {k: v for k, v in single.param_groups[0].items() if k != "params"}
            state = single.state.get(p)
        key = _hashable(options)
        if self.torch_optimizer is None:
            self.torch_optimizer = self.pt_optim_constructor([p], **options)
            self._groups[key] = 0
        elif key in self._groups:
            self.torch_optimizer.param_groups[self._groups[key]]["params"].append(p)
        else:
            self.torch_optimizer.add_param_group({"params": [p], **options})
            self._groups[key] = len(self.torch_optimizer.param_groups) - 1
        if state is not None:
            self.torch_optimizer.state[p] = state
        self.optim_objs[p] = self.torch_optimizer
        self.grad_clip[p] = self._get_grad_clip(p)

    def get_state(self) -> dict:
        """Pyro's format: ``{param name: the state_dict of a one-parameter optimizer}``."""
        out = {}
        if self.torch_optimizer is None:
            return out
        store = pyro.get_param_store()
        for group in self.torch_optimizer.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                name = store.param_name(p)
                if name is None:
                    continue
                state = self.torch_optimizer.state.get(p)
                out[name] = {"state": {0: state} if state else {}, "param_groups": [{**options, "params": [0]}]}
        return out


def _hashable(options: dict):
    try:
        key = tuple(sorted(options.items()))
        hash(key)
        return key
    except TypeError:
        return repr(sorted(options.items()))


def Adam(optim_args: dict | Callable[..., dict], clip_args: dict | Callable[..., dict] | None = None) -> GroupedOptim:
    """``pyro.optim.Adam`` with one ``torch.optim.Adam`` for all parameters (:class:`GroupedOptim`)."""
    return GroupedOptim(torch.optim.Adam, optim_args, clip_args)


def AdamW(optim_args: dict | Callable[..., dict], clip_args: dict | Callable[..., dict] | None = None) -> GroupedOptim:
    """``pyro.optim.AdamW`` with one ``torch.optim.AdamW`` for all parameters (:class:`GroupedOptim`)."""
    return GroupedOptim(torch.optim.AdamW, optim_args, clip_args)


def SGD(optim_args: dict | Callable[..., dict], clip_args: dict | Callable[..., dict] | None = None) -> GroupedOptim:
    """``pyro.optim.SGD`` with one ``torch.optim.SGD`` for all parameters (:class:`GroupedOptim`)."""
    return GroupedOptim(torch.optim.SGD, optim_args, clip_args)
