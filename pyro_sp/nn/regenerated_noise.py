# SPDX-License-Identifier: Apache-2.0
r"""
The exact estimator's ``Linear`` layers with their weight noise drawn inside the
matrix products and drawn again in backward, so that the particles' noise and
weights are never written (the weight gradients' per-particle products are, a
chunk of particles at a time): :class:`~pyro_sp.nn.MeanFieldVI` with
``weight_noise="regenerated"``.

A ``Linear`` layer whose weight has the guide
:math:`q(W) = \mathcal N(\mu, \sigma^2)` computes, for particles
:math:`n = 1 \dots N` with inputs :math:`x_n` of shape ``(M, K)``,

.. math::

    y_n = x_n W_n^\top, \qquad W_n = \mu + \sigma \odot \varepsilon_n,
    \qquad \varepsilon_n \sim \mathcal N(0, I),

and its backward pass needs, with :math:`G_n = \partial \mathcal L / \partial y_n`,

.. math::

    \frac{\partial \mathcal L}{\partial x_n} = G_n W_n, \qquad
    \frac{\partial \mathcal L}{\partial \mu} = \sum_n G_n^\top x_n, \qquad
    \frac{\partial \mathcal L}{\partial \sigma} = \sum_n (G_n^\top x_n) \odot \varepsilon_n .

Stored, :math:`\varepsilon` and :math:`W` are :math:`2 N O K` numbers written
and read several times a step (at :math:`N = 32` on a 3072→2048→2048→10 MLP,
1.3 GB each). Here each kernel (:mod:`pyro_sp.nn._noise_kernels`) draws the
tile of :math:`\varepsilon_n` it needs from particle :math:`n`'s 64-bit seed and
the tile's position (Philox4x32-10, the generator of cuRAND and of PyTorch's
CUDA tensors, and Box–Muller), forms :math:`W_n` in registers and multiplies.
The weight gradients need :math:`P_n = G_n^\top x_n`, a product with no noise
in it: the BLAS forms them for a chunk of particles at a time (at most
:data:`CHUNK_BYTES`), and one kernel reads each once and adds :math:`P_n` and
:math:`P_n \odot \varepsilon_n` into the two sums, drawing the noise again (on one
H100 this took about 60 % of the time of one kernel that formed the products itself
with the noise in its epilogue; ``BENCHMARKS.md``). The same seed
gives the same :math:`\varepsilon_n` in every kernel, so the gradients are those
of the loss that was computed: the estimator is the exact one, with the noise
from another generator. :func:`weight_noise` writes the noise of given seeds
out, which is how the tests check this against the stored-noise step.

The sampled KL (``kl="sample"``) needs of the noise only
:math:`m_1 = \sum_n \varepsilon_n` and :math:`m_2 = \sum_n \varepsilon_n^2`
(:func:`noise_moments`), since for a prior :math:`\mathcal N(0, s^2)`

.. math::

    \sum_n \log p(W_n) = -\frac{1}{2 s^2} \sum \big(N \mu^2 + 2 \mu \sigma m_1 + \sigma^2 m_2\big)
        - N O K \log(\sqrt{2 \pi} s), \qquad
    \sum_n \log q(W_n) = -\tfrac12 \sum m_2 - N \sum \log \sigma - N O K \log \sqrt{2 \pi}.

The kernels are Triton's: compiled for CUDA tensors; CPU tensors run in
Triton's interpreter (slow: for tests). Without Triton installed, using them
raises an :class:`ImportError` that says how to install it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os

import torch

__all__ = ["RegeneratedNoiseLinear", "draw_seeds", "noise_linear", "noise_moments", "weight_noise"]

#: Philox rounds (10: the Philox4x32-10 of Salmon et al. 2011, as cuRAND and PyTorch use).
ROUNDS = 10
_PRECISIONS = ("ieee", "tf32", "bf16")
_KERNELS: dict[bool, object] = {}

# tile sizes tried per kernel on CUDA (the autotuner keeps the fastest per shape), and the one
# tile the interpreter runs
_CUDA_TILES = {
    # a whole batch of 256 rows per tile (BM = 256) draws each weight tile's noise once per particle; a
    # K step of 16 keeps two programs on an SM, one drawing while the other's products run (one H100,
    # benchmarks/kernel_tiles.py); the last one suits small layers (O = 10)
    "forward": [(256, 64, 16, 8, 3), (256, 64, 16, 8, 4), (256, 64, 32, 8, 3), (256, 128, 16, 8, 3),
                (256, 64, 16, 4, 3), (128, 128, 32, 8, 3), (128, 32, 64, 4, 4)],
    "grad_input": [(256, 64, 16, 8, 3), (256, 64, 16, 8, 4), (256, 64, 32, 8, 3), (256, 128, 16, 8, 3),
                   (256, 64, 16, 4, 3), (128, 128, 32, 8, 3)],
    # memory-bound: one read of the products, the noise drawn, two (O, K) sums
    "weight_grad": [(32, 64, 0, 4, 3), (64, 64, 0, 4, 3), (32, 128, 0, 4, 3), (64, 128, 0, 8, 3),
                    (128, 64, 0, 8, 3), (16, 128, 0, 4, 4)],
}
_NAMES = {"forward": ("BM", "BO", "BK"), "grad_input": ("BM", "BK", "BO"), "weight_grad": ("BO", "BK")}
_KEYS = {"forward": ["N", "M", "O", "K"], "grad_input": ["N", "M", "O", "K"], "weight_grad": ["C", "O", "K"]}
#: what a weight_grad launch adds to, restored between the autotuner's trial runs
_RESTORE = {"weight_grad": ["gloc", "gscale"]}
#: the sizes each kernel's tile sides divide when its constant ``EVEN`` is set (no masks in its loop)
_EVEN = {"forward": (("M", "BM"), ("O", "BO"), ("K", "BK")), "grad_input": (("M", "BM"), ("O", "BO"), ("K", "BK")),
         "weight_grad": (("O", "BO"), ("K", "BK"))}
_INTERPRETER_TILE = (16, 16, 16)
_NOISE_TILE = (32, 64)


def even(kind: str, args: dict) -> bool:
    """Whether ``kind``'s tile divides its tensors for a launch's arguments ``args`` (sizes and tile):
    its ``EVEN`` constant."""
    return all(args[size] % args[side] == 0 for size, side in _EVEN[kind])


@contextlib.contextmanager
def _interpreting(on: bool):
    import triton

    knobs = getattr(triton, "knobs", None)
    old_env, old_knob = os.environ.get("TRITON_INTERPRET"), None
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    if knobs is not None:
        old_knob = knobs.runtime.interpret
        knobs.runtime.interpret = on
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env
        if knobs is not None:
            knobs.runtime.interpret = old_knob


def _language_objects() -> list:
    """What Triton's interpreter patches for a launch: ``triton.language`` and its parts."""
    import triton.language as tl

    objects = [tl, tl.core, tl.math, tl.core.tensor, tl.core.dtype]
    descriptor = getattr(tl.core, "tensor_descriptor_base", None)
    return objects + ([descriptor] if descriptor is not None else [])


@contextlib.contextmanager
def _language_restored():
    """Undo what an interpreted launch patched into ``triton.language``. Triton's interpreter (3.5)
    leaves its numpy builders in place after a launch, and a kernel compiled for a GPU later in the
    same process then fails in the compiler."""
    saved = [(obj, dict(vars(obj))) for obj in _language_objects()]
    try:
        yield
    finally:
        for obj, before in saved:
            now = vars(obj)
            for name in [n for n in now if n not in before]:
                delattr(obj, name)
            for name, value in before.items():
                if now.get(name, _MISSING) is not value:
                    setattr(obj, name, value)


_MISSING = object()


class _Interpreted:
    """A kernel run by Triton's interpreter with one tile (``meta``), launched as an autotuned one is,
    leaving ``triton.language`` as it found it."""

    def __init__(self, kernel, meta: dict) -> None:
        self.kernel, self.meta = kernel, meta

    def __getitem__(self, grid):
        resolved = grid(self.meta) if callable(grid) else grid

        def launch(*args, **kwargs):
            with _language_restored():
                return self.kernel[resolved](*args, **kwargs, **self.meta)

        return launch


def _index_scalars() -> None:
    """Triton's interpreter holds a kernel's scalar arguments as one-element arrays and turns them
    into loop bounds with ``int(array)``, which NumPy 2.4 refuses for arrays of one dimension; let it
    take the element (once per process; the patched function's arguments differ across Triton versions)."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_pyro_sp", False):
        return

    def patched(tensor, *args, **kwargs):
        patch(tensor, *args, **kwargs)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])

    patched._pyro_sp = True
    interpreter._patch_lang_tensor = patched


def require_triton() -> None:
    """Raise an :class:`ImportError` that says how to install Triton where it cannot be imported."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "weight_noise='regenerated' runs Triton kernels, but Triton is not installed. Install it "
            "(`pip install triton`; CUDA builds of PyTorch ship with it) or use weight_noise='stored'."
        ) from e


def kernel_module(interpret: bool):
    """A fresh copy of :mod:`pyro_sp.nn._noise_kernels`, its kernels decorated for Triton's interpreter
    (``interpret``) or its compiler (a module of its own per mode: a kernel calls the helpers of its
    own mode)."""
    if interpret:
        _index_scalars()
    spec = importlib.util.find_spec("pyro_sp.nn._noise_kernels")
    module = importlib.util.module_from_spec(spec)
    with _interpreting(interpret):
        spec.loader.exec_module(module)
    return module


def kernels(device: torch.device):
    """The kernels for tensors on ``device``: compiled and autotuned for CUDA, interpreted otherwise."""
    interpret = device.type != "cuda"
    if interpret not in _KERNELS:
        require_triton()
        import triton

        module = kernel_module(interpret)
        if interpret:  # the two noise kernels take their tile from the caller
            module.noise_kernel = _Interpreted(module.noise_kernel, {})
            module.moments_kernel = _Interpreted(module.moments_kernel, {})
        for kind in ("forward", "grad_input", "weight_grad"):
            kernel = triton.heuristics({"EVEN": functools.partial(even, kind)})(getattr(module, f"{kind}_kernel"))
            if interpret:
                launcher = _Interpreted(kernel, dict(zip(_NAMES[kind], _INTERPRETER_TILE)))
            else:
                configs = [triton.Config(dict(zip(_NAMES[kind], tile[:3])), num_warps=tile[3], num_stages=tile[4])
                           for tile in _CUDA_TILES[kind]]
                launcher = triton.autotune(configs, key=_KEYS[kind], restore_value=_RESTORE.get(kind))(kernel)
            setattr(module, kind, launcher)
        _KERNELS[interpret] = module
    return _KERNELS[interpret]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _accumulator(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(x: torch.Tensor, loc: torch.Tensor, requested: str) -> str:
    if requested not in _PRECISIONS:
        raise ValueError(f"Expected precision in {_PRECISIONS}, got {requested!r}.")
    if torch.float64 in (x.dtype, loc.dtype):
        return "ieee"
    if requested == "bf16" and x.device.type != "cuda":
        return "bf16_emulated"
    return requested


def _check(x, loc, scale, seeds) -> None:
    if loc.dim() != 2 or scale.shape != loc.shape:
        raise ValueError(f"Expected a weight mean and scale of one shape (out, in), got {tuple(loc.shape)} "
                         f"and {tuple(scale.shape)}.")
    if seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise ValueError(f"Expected the particles' seeds as a 1-d int64 tensor, got {seeds.dtype} "
                         f"{tuple(seeds.shape)}.")
    if x.shape[-1] != loc.shape[1]:
        raise ValueError(f"Expected inputs with {loc.shape[1]} features (the weight is {tuple(loc.shape)}), "
                         f"got {tuple(x.shape)}.")
    # x is (N, M, K), or (M, K) shared by the particles (read, and its gradient written, once)
    sizes = {"the weight": loc.numel(), "the inputs": x.numel(),
             "the outputs": seeds.shape[0] * x.shape[-2] * loc.shape[0]}
    large = {k: v for k, v in sizes.items() if v >= 2**31}
    if large:
        raise ValueError(
            f"Expected fewer than 2**31 elements per tensor of a regenerated-noise layer (the kernels index "
            f"with 32-bit offsets), got {large}. Use fewer particles per rank (a larger sample axis) or "
            "a smaller batch, or weight_noise='stored'."
        )
    devices = {t.device for t in (x, loc, scale, seeds)}
    if len(devices) != 1:
        raise ValueError(f"Expected the inputs, weight and seeds on one device, got {sorted(map(str, devices))}.")


def draw_seeds(num: int, device: torch.device) -> torch.Tensor:
    """``num`` particles' 64-bit seeds, from the current random stream (one draw per layer and step)."""
    return torch.randint(-(2**63), 2**63 - 1, (num,), dtype=torch.int64, device=device)


# ---- the operators ------------------------------------------------------------------------------
@torch.library.custom_op("pyro_sp::noise_linear", mutates_args=())
def noise_linear(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, seeds: torch.Tensor, shared: bool,
                 precision: str) -> torch.Tensor:
    """
    :math:`y_n = x_n (\\mu + \\sigma \\varepsilon_n)^\\top` for the particles' ``seeds`` ``(N,)``.

    :param x: ``(N, M, K)``, or ``(M, K)`` with ``shared=True`` (one input for all particles).
    :param loc: :math:`\\mu`, ``(O, K)``. :param scale: :math:`\\sigma`, ``(O, K)``.
    :param str precision: the products' inputs: ``"ieee"`` (fp32), ``"tf32"`` or ``"bf16"``
        (accumulated in fp32 either way).
    :returns: ``(N, M, O)``, in ``x``'s dtype.
    """
    _check(x, loc, scale, seeds)
    k = kernels(x.device)
    loc, scale = loc.contiguous(), scale.contiguous()
    N, (O, K), M = seeds.shape[0], loc.shape, x.shape[-2]
    y = torch.empty((N, M, O), dtype=x.dtype, device=x.device)
    if N == 0 or M == 0 or O == 0:
        return y.zero_()
    precision = _precision(x, loc, precision)
    sxn = 0 if shared else x.stride(0)

    def grid(meta):  # the particles fastest (forward_kernel)
        return (N * _cdiv(M, meta["BM"]) * _cdiv(O, meta["BO"]),)

    k.forward[grid](x, loc, scale, seeds, y, N, M, O, K, _cdiv(K, 4), sxn, x.stride(-2), x.stride(-1),
                    *y.stride(), ROUNDS=ROUNDS, PRECISION=precision, ACC=_accumulator(x.dtype))
    return y


@noise_linear.register_fake
def _(x, loc, scale, seeds, shared, precision):
    return x.new_empty((seeds.shape[0], x.shape[-2], loc.shape[0]))


@torch.library.custom_op("pyro_sp::noise_linear_backward", mutates_args=())
def noise_linear_backward(gy: torch.Tensor, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                          seeds: torch.Tensor, shared: bool, precision: str,
                          input_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`noise_linear` for the output gradient ``gy`` ``(N, M, O)``:
    ``(grad x or an empty tensor if not input_grad, grad loc, grad scale)``."""
    k = kernels(x.device)
    loc, scale = loc.contiguous(), scale.contiguous()
    N, (O, K), M = seeds.shape[0], loc.shape, x.shape[-2]
    kq, precision, acc = _cdiv(K, 4), _precision(x, loc, precision), _accumulator(x.dtype)
    gx = torch.empty(0, dtype=x.dtype, device=x.device)
    if input_grad:
        gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if N == 0 or M == 0 or O == 0:
            gx.zero_()
        else:
            def grid(meta):  # the particles fastest (grad_input_kernel), or one sum over them
                return ((1 if shared else N) * _cdiv(M, meta["BM"]) * _cdiv(K, meta["BK"]),)

            k.grad_input[grid](gy, loc, scale, seeds, gx, N, M, O, K, kq, *gy.stride(),
                               0 if shared else gx.stride(0), gx.stride(-2), gx.stride(-1),
                               SUM_PARTICLES=shared, ROUNDS=ROUNDS, PRECISION=precision, ACC=acc)
    gloc, gscale = _weight_grads(k, gy, x, seeds, shared, precision)
    return gx, gloc.to(loc.dtype), gscale.to(loc.dtype)


#: the most memory the particles' weight-gradient products take at a time (a chunk of particles). 1 GiB
#: instead of 256 MiB took the MLP's step at N = 64 (CUDA graphs) from 8.68 and 8.92 ms (two runs) to
#: 8.26 ms (one run), and its peak without graphs from 1.2-1.6 to 1.9 GiB (one H100, BENCHMARKS.md
#: round 8; raw torch.compile: 4.2 GiB)
CHUNK_BYTES = 2**30


def _chunks(N: int, O: int, K: int, itemsize: int = 4):
    """``(first, last)`` particle ranges whose ``(O, K)`` tensors take at most :data:`CHUNK_BYTES`."""
    chunk = max(1, min(N, CHUNK_BYTES // max(1, O * K * itemsize)))
    return [(first, min(N, first + chunk)) for first in range(0, N, chunk)]


def _weight_grads(k, gy, x, seeds, shared, precision) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\sum_n G_n^\top x_n` and :math:`\sum_n (G_n^\top x_n) \odot \varepsilon_n`: the products
    :math:`P_n = G_n^\top x_n` by the BLAS for a chunk of particles at a time (at most
    :data:`CHUNK_BYTES`), then one pass over them that adds :math:`P_n` and :math:`P_n \varepsilon_n`, the
    noise drawn again (:func:`~pyro_sp.nn._noise_kernels.weight_grad_kernel`). In fp32, or float64."""
    N, M, O = gy.shape
    K = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    gloc = torch.empty((O, K), dtype=dtype, device=x.device)
    gscale = torch.empty((O, K), dtype=dtype, device=x.device)
    if N == 0 or M == 0 or O == 0 or K == 0:
        return gloc.zero_(), gscale.zero_()
    grid = lambda meta: (_cdiv(O, meta["BO"]) * _cdiv(K, meta["BK"]),)
    for first, last in _chunks(N, O, K, gloc.element_size()):
        p = _weight_products(gy[first:last], x if shared else x[first:last], shared, precision, dtype)
        k.weight_grad[grid](p, seeds, gloc, gscale, first, last - first, O, K, _cdiv(K, 4),
                            ACCUMULATE=first > 0, ROUNDS=ROUNDS)
        del p  # freed before the next chunk's products: one chunk alive at a time
    return gloc, gscale


def _weight_products(gy, x, shared, precision, dtype) -> torch.Tensor:
    r""":math:`P_n = G_n^\top x_n`, ``(C, O, K)`` in ``dtype``, for ``gy`` ``(C, M, O)`` and ``x``
    ``(C, M, K)`` or, ``shared``, ``(M, K)``, with the inputs in the ``precision`` the forward kernel
    multiplied them in. One batched product: :math:`G_n^\top` read transposed where it lies, and a
    shared input as a batch of stride 0 (folding the particles into one ``(C O, M) @ (M, K)`` product
    would copy :math:`G^\top` first, since its rows are not evenly spaced)."""
    gt = gy.transpose(1, 2)
    if precision == "bf16_emulated":  # bf16 inputs, fp32 products (exact) and sums: the same numbers
        gt, x = gt.to(torch.bfloat16).to(dtype), x.to(torch.bfloat16).to(dtype)
    elif precision == "bf16":
        gt, x = gt.to(torch.bfloat16), x.to(torch.bfloat16)
    else:
        x = x.to(gt.dtype)
    if shared:  # converted before it is expanded: a conversion would write each particle's copy
        x = x.expand(gt.shape[0], *x.shape)
    if precision == "bf16":
        return _bf16_product(gt, x)
    with _blas_precision(precision):
        return torch.bmm(gt, x)


#: whether torch's bmm takes ``out_dtype`` (bf16 inputs, fp32 output; CUDA, recent torch)
_OUT_DTYPE = True


def _bf16_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)`` of bf16 tensors, accumulated and returned in fp32: by the bf16 BLAS with
    ``out_dtype``, or, where torch has no ``out_dtype``, as TF32 products of the same bf16 values
    (exact in TF32, whose 10-bit mantissa holds bf16's 7: the same numbers, slower)."""
    global _OUT_DTYPE
    if _OUT_DTYPE:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except TypeError:  # older torch: no out_dtype
            _OUT_DTYPE = False
    # a shared input (batch stride 0) converted once, not once per particle
    b = b[0].float().expand(b.shape) if b.stride(0) == 0 else b.float()
    with _blas_precision("tf32"):
        return torch.bmm(a.float(), b)


@contextlib.contextmanager
def _blas_precision(precision: str):
    """torch's fp32 products in TF32 for ``"tf32"`` and in fp32 otherwise, for the block (restored
    after, in the API it was read from: torch refuses to read the old one once the new one is set)."""
    matmul = torch.backends.cuda.matmul
    wanted = precision == "tf32"
    if fp32_matmul_precision() == ("tf32" if wanted else "ieee"):
        # already so (MeanFieldVI's layers take their precision from this setting): left alone, not
        # written back, which would pin an inherited setting (torch.backends.fp32_precision) and race
        # with other threads' products
        yield
        return
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        old = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if wanted else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:  # pragma: no cover - older torch
        old = matmul.allow_tf32
        matmul.allow_tf32 = wanted
        try:
            yield
        finally:
            matmul.allow_tf32 = old


@noise_linear_backward.register_fake
def _(gy, x, loc, scale, seeds, shared, precision, input_grad):
    gx = x.new_empty(x.shape) if input_grad else x.new_empty(0)
    return gx, loc.new_empty(loc.shape), scale.new_empty(scale.shape)


def _setup_context(ctx, inputs, output):
    x, loc, scale, seeds, shared, precision = inputs
    ctx.save_for_backward(x, loc, scale, seeds)
    ctx.shared, ctx.precision = shared, precision


def _backward(ctx, gy):
    x, loc, scale, seeds = ctx.saved_tensors
    input_grad = ctx.needs_input_grad[0]
    gx, gloc, gscale = noise_linear_backward(gy, x, loc, scale, seeds, ctx.shared, ctx.precision, input_grad)
    return (gx if input_grad else None), gloc, gscale, None, None, None


noise_linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("pyro_sp::noise_linear_particle", mutates_args=())
def noise_linear_particle(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, seed: torch.Tensor,
                          precision: str) -> torch.Tensor:
    """One particle's :func:`noise_linear` (``x`` ``(..., K)``, ``seed`` 0-d): what a layer calls under
    :func:`torch.func.vmap`, whose rule batches the particles into one :func:`noise_linear`."""
    return noise_linear(x.reshape(1, -1, x.shape[-1]), loc, scale, seed.reshape(1), False,
                        precision).reshape(*x.shape[:-1], loc.shape[0])


@noise_linear_particle.register_fake
def _(x, loc, scale, seed, precision):
    return x.new_empty((*x.shape[:-1], loc.shape[0]))


def _particles(info, in_dims, x, loc, scale, seed, precision):
    x_dim, loc_dim, scale_dim, seed_dim, _ = in_dims
    if loc_dim is not None or scale_dim is not None or seed_dim is None:
        raise ValueError(
            "Expected a layer with regenerated weight noise to be run by MeanFieldVI, under one vmap over "
            "the particles with the seeds batched and the weight's mean and scale shared; got batched "
            f"dimensions (input, mean, scale, seed) = {tuple(in_dims[:4])}."
        )
    seeds = seed.movedim(seed_dim, 0).reshape(-1)
    num, features = seeds.shape[0], x.shape[-1]
    if x_dim is None:  # the same input for every particle (the first layer)
        y = noise_linear(x.reshape(-1, features), loc, scale, seeds, True, precision)
        return y.reshape(num, *x.shape[:-1], loc.shape[0]), 0
    x = x.movedim(x_dim, 0)
    y = noise_linear(x.reshape(num, -1, features), loc, scale, seeds, False, precision)
    return y.reshape(*x.shape[:-1], loc.shape[0]), 0


noise_linear_particle.register_vmap(_particles)


@torch.no_grad()
def weight_noise(seeds: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The noise :math:`\\varepsilon_n` the kernels draw for ``seeds`` ``(N,)`` and a weight of
    ``shape`` ``(O, K)``, written out: ``(N, O, K)``."""
    O, K = shape
    out = torch.empty((seeds.shape[0], O, K), dtype=dtype, device=seeds.device)
    if out.numel():
        bo, bk = _NOISE_TILE
        kernels(seeds.device).noise_kernel[(_cdiv(O, bo) * _cdiv(K, bk), seeds.shape[0])](
            seeds, out, O, K, _cdiv(K, 4), BO=bo, BK=bk, ROUNDS=ROUNDS)
    return out


def noise_moments(seeds: torch.Tensor, shape: tuple[int, int],
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """:math:`\\sum_n \\varepsilon_n` and :math:`\\sum_n \\varepsilon_n^2` (each ``shape``), drawn again
    from ``seeds``, without writing the noise."""
    return _noise_moments(seeds, torch.empty(shape, dtype=dtype, device=seeds.device))


@torch.library.custom_op("pyro_sp::noise_moments", mutates_args=())
def _noise_moments(seeds: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    (O, K), dtype = like.shape, like.dtype
    m1 = torch.zeros((O, K), dtype=dtype, device=seeds.device)
    m2 = torch.zeros((O, K), dtype=dtype, device=seeds.device)
    if m1.numel() and seeds.shape[0]:
        bo, bk = _NOISE_TILE
        kernels(seeds.device).moments_kernel[(_cdiv(O, bo) * _cdiv(K, bk),)](
            seeds, m1, m2, seeds.shape[0], O, K, _cdiv(K, 4), BO=bo, BK=bk, ROUNDS=ROUNDS)
    return m1, m2


@_noise_moments.register_fake
def _(seeds, like):
    return like.new_empty(like.shape), like.new_empty(like.shape)


def sampled_log_densities(loc, scale, prior_scale: float, seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """:math:`\\sum_n \\log p(W_n)` and :math:`\\sum_n \\log q(W_n)` for the weight draws of ``seeds``
    (prior :math:`\\mathcal N(0, s^2)`), differentiable in ``loc`` and ``scale`` (module docstring)."""
    m1, m2 = _noise_moments(seeds, loc.detach())
    num, size = seeds.shape[0], loc.numel()
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    log_p = -(num * loc**2 + 2 * loc * scale * m1 + scale**2 * m2).sum() / (2 * prior_scale**2) \
        - num * size * (math.log(prior_scale) + half_log_2pi)
    log_q = -0.5 * m2.sum() - num * scale.log().sum() - num * size * half_log_2pi
    return log_p, log_q


def fp32_matmul_precision() -> str:
    """``"tf32"`` where torch lets CUDA fp32 products run in TF32, else ``"ieee"``: set by
    ``torch.backends.cuda.matmul.fp32_precision`` (or, inherited, ``torch.backends.fp32_precision``),
    ``allow_tf32`` or :func:`torch.set_float32_matmul_precision`, whichever API set it."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: reads both APIs' settings (the old one's
        # getter refuses to read once the new one was set)
        setting = matmul.fp32_precision
        if setting == "none":
            setting = torch.backends.fp32_precision
        return "tf32" if setting == "tf32" else "ieee"
    return "tf32" if matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest" else "ieee"  # pragma: no cover


class RegeneratedNoiseLinear(torch.nn.Module):
    """
    A ``Linear`` whose Bayesian weight is drawn inside its products (:func:`noise_linear`). It holds
    no values: :func:`torch.func.functional_call` passes them by name: ``weight`` the guide's mean,
    ``weight_scale`` its scale, ``weight_seed`` the particle's seed (batched by the vmap over the
    particles), ``bias`` a draw or a deterministic value.
    """

    def __init__(self, layer: torch.nn.Linear, bayesian_bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        for name in ("weight", "weight_scale", "weight_seed"):
            self.register_buffer(name, torch.empty(0), persistent=False)
        self.register_buffer("bias", None if layer.bias is None else torch.empty(0), persistent=False)
        #: the fp32 products' precision, set from :func:`fp32_matmul_precision` before each call by
        #: whoever runs the layer (outside compiled code, which cannot read torch's setting)
        self.fp32_precision = "ieee"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        precision = "bf16" if (torch.is_autocast_enabled(device)
                               and torch.get_autocast_dtype(device) == torch.bfloat16) else self.fp32_precision
        y = noise_linear_particle(x, self.weight, self.weight_scale, self.weight_seed, precision)
        return y if self.bias is None else y + self.bias
