# SPDX-License-Identifier: Apache-2.0
r"""
Lower-variance estimators of the same mean-field ELBO gradient for the layers
whose Bayesian weight enters through a matrix product: the local
reparameterization trick [1] and Flipout [2]. :class:`~pyro_sp.nn.MeanFieldVI`
uses them with ``estimator="local_reparam"`` or ``"flipout"``.

For a layer :math:`a = x W^\top + b` with :math:`W \sim \mathcal N(\mu, \sigma^2)`
elementwise (and :math:`b \sim \mathcal N(\mu_b, \sigma_b^2)`), per example
:math:`i` of the batch:

- **Local reparameterization** draws the pre-activation instead of the weight:

  .. math::

      a_i = x_i \mu^\top + \mu_b + \sqrt{x_i^2 (\sigma^2)^\top + \sigma_b^2} \odot \varepsilon_i,
      \qquad \varepsilon_i \sim \mathcal N(0, I).

  Each example's pre-activation has exactly the distribution it has under a
  sampled weight, so each example's expected log-likelihood, and with it the
  ELBO and its gradient, is unchanged; the examples of a batch no longer share
  one weight draw, which lowers the variance. No particle-sized weight tensor
  is drawn: the first layer's two products are shared by all particles. It is
  exact only where each example uses the weight once: a ``Linear`` whose input
  is ``(batch, features)`` per particle (another input shape raises; convolution
  weights are drawn as usual), and it samples
  no weights, so the KL term must be the closed form (``kl="analytic"``).

- **Flipout** draws one weight perturbation :math:`\Delta W = \sigma \odot \epsilon`
  per particle and decorrelates the examples with random signs
  :math:`r_i \in \{\pm 1\}^{\text{in}}`, :math:`s_i \in \{\pm 1\}^{\text{out}}`:

  .. math::

      a_i = x_i \mu^\top + \big((x_i \odot r_i)\, \Delta W^\top\big) \odot s_i + b.

  Example :math:`i` sees the weight :math:`\mu + \Delta W \odot s_i r_i^\top`,
  which has the distribution of :math:`W` (a symmetric perturbation with its
  signs flipped), the same for all its positions (tokens, pixels: the signs
  are per example), so the estimator is unbiased for any input shape, for
  ``Linear`` and ``Conv2d`` (signs per input and output channel). It costs a
  second matrix product per layer.

Both assume that dimension 0 of the layer's input (per particle) indexes the
examples of the batch. Other Bayesian tensors are sampled as usual.

References

[1] Kingma, Salimans, Welling, `Variational Dropout and the Local
    Reparameterization Trick`, NeurIPS 2015.
[2] Wen, Vicol, Ba, Tran, Grosse, `Flipout: Efficient Pseudo-Independent
    Weight Perturbations on Mini-Batches`, ICLR 2018.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

__all__ = ["ESTIMATORS", "LayerEstimator", "reparameterized_layers", "swap_layers"]

#: The estimators of :class:`~pyro_sp.nn.MeanFieldVI`: the exact one (weights sampled,
#: Pyro's ``Trace_ELBO`` / ``TraceMeanField_ELBO``) and the two of this module.
ESTIMATORS = ("exact", "local_reparam", "flipout")


def _signs(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, shape, device=like.device).to(like.dtype) * 2 - 1


class LayerEstimator(torch.nn.Module):
    """
    A ``Linear`` or ``Conv2d`` evaluated by an estimator of this module. It holds
    no values: :func:`torch.func.functional_call` passes them, by name:

    ``weight`` the guide's mean :math:`\\mu`; ``weight_scale`` :math:`\\sigma` (local
    reparameterization) or ``weight_delta`` :math:`\\Delta W` (Flipout, one per
    particle); ``bias`` the bias (a mean, a draw or a deterministic value);
    ``bias_scale`` :math:`\\sigma_b` where the bias is Bayesian and locally reparameterized.
    """

    def __init__(self, layer: torch.nn.Module, kind: str, bayesian_bias: bool) -> None:
        super().__init__()
        if kind not in ESTIMATORS[1:]:
            raise ValueError(f"Expected kind in {ESTIMATORS[1:]}, got {kind!r}.")
        self.kind, self.bayesian_bias = kind, bayesian_bias
        self.conv = isinstance(layer, torch.nn.Conv2d)
        if self.conv:
            self.stride, self.padding, self.dilation, self.groups = (layer.stride, layer.padding,
                                                                     layer.dilation, layer.groups)
        # empty placeholders for functional_call (never read: every call passes the values)
        self.register_buffer("weight", torch.empty(0), persistent=False)
        self.register_buffer("bias", None if layer.bias is None else torch.empty(0), persistent=False)
        self.register_buffer("weight_scale" if kind == "local_reparam" else "weight_delta", torch.empty(0),
                             persistent=False)
        if kind == "local_reparam" and bayesian_bias:
            self.register_buffer("bias_scale", torch.empty(0), persistent=False)

    def _product(self, x, weight, bias=None):
        if self.conv:
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "local_reparam":
            if x.dim() != 2:
                raise ValueError(
                    f"Expected a Linear layer with a (batch, features) input per particle for "
                    f"estimator='local_reparam', got input shape {tuple(x.shape)}: there an example "
                    "uses each weight more than once and "
                    "the local reparameterization would be biased. Use estimator='flipout' (unbiased for "
                    "any input) or 'exact'."
                )
            mean = self._product(x, self.weight, self.bias)
            var = self._product(x * x, self.weight_scale * self.weight_scale,
                                self.bias_scale * self.bias_scale if self.bayesian_bias else None)
            return mean + var.clamp_min(0).sqrt() * torch.randn_like(mean)
        mean = self._product(x, self.weight, self.bias)
        if self.conv:
            r = _signs((x.shape[0], x.shape[1], 1, 1), x)
        else:
            r = _signs((x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],), x)
        delta = self._product(x * r, self.weight_delta)
        if self.conv:
            s = _signs((x.shape[0], delta.shape[1], 1, 1), x)
        else:
            s = _signs((x.shape[0],) + (1,) * (x.dim() - 2) + (delta.shape[-1],), x)
        return mean + delta * s


def reparameterized_layers(module: torch.nn.Module, bayesian: list[str], kind: str) -> dict[str, bool]:
    """
    The layers estimator ``kind`` evaluates: ``{layer path: whether its bias is Bayesian}``
    for every ``Linear`` (and, for Flipout, ``Conv2d`` with ``padding_mode="zeros"``) of
    ``module`` whose weight is in ``bayesian``; the others' weights are drawn as usual.
    (``kind="regenerated"``: the ``Linear`` layers whose weight noise the exact estimator
    draws inside its kernels, :mod:`pyro_sp.nn.regenerated_noise`.)
    """
    chosen = set(bayesian)
    out = {}
    for path, m in module.named_modules():
        conv_ok = kind == "flipout" and isinstance(m, torch.nn.Conv2d) and m.padding_mode == "zeros"
        if not (isinstance(m, torch.nn.Linear) or conv_ok):
            continue
        prefix = f"{path}." if path else ""
        if f"{prefix}weight" in chosen:
            out[path] = m.bias is not None and f"{prefix}bias" in chosen
    return out


def swap_layers(module: torch.nn.Module, layers: dict[str, bool], make) -> torch.nn.Module:
    """A copy of ``module`` whose ``layers`` (:func:`reparameterized_layers`) are replaced by
    ``make(layer, bayesian_bias)``: a :class:`LayerEstimator`, or the exact estimator's
    :class:`~pyro_sp.nn.regenerated_noise.RegeneratedNoiseLinear`."""
    out = copy.deepcopy(module)
    for path, bayesian_bias in layers.items():
        original = out.get_submodule(path)
        replacement = make(original, bayesian_bias)
        if not path:
            return replacement
        parent, _, name = path.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, name, replacement)
    return out
