# SPDX-License-Identifier: Apache-2.0
"""Regenerated weight noise (pyro_sp.nn.regenerated_noise): the kernels' products and
gradients equal eager PyTorch's on the noise of the same seeds, written out (float64,
Triton's interpreter on the CPU); the noise is standard normal, the same in every kernel
whatever its tiling; MeanFieldVI(weight_noise="regenerated") equals the stored-noise step
(itself tested against Pyro's) given the same noise, on a mesh equals one process, compiled
equals eager, and with real noise its loss has the stored estimator's mean; the kernels
compile for sm_90."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from pyro_sp.nn import BayesianModule, MeanFieldVI, last_layer  # noqa: E402
from pyro_sp.nn import regenerated_noise as rn  # noqa: E402
from tests.common import assert_close  # noqa: E402

CPU = torch.device("cpu")


def _reference(x, loc, scale, seeds, shared):
    eps = rn.weight_noise(seeds, tuple(loc.shape), loc.dtype)
    return torch.einsum("mk,nok->nmo" if shared else "nmk,nok->nmo", x, loc + scale * eps)


@pytest.mark.parametrize("shared", [False, True])
# (N, M, O, K); the interpreter's tiles are 16 wide: M = 37 is three row chunks, the last one partial;
# (2, 32, 16, 48): every size a multiple of the tiles, the loops without masks (EVEN)
@pytest.mark.parametrize("shape", [(3, 9, 10, 21), (1, 1, 5, 3), (4, 12, 20, 36), (2, 37, 6, 9), (2, 32, 16, 48)])
def test_products_and_gradients_equal_eager_on_the_same_noise(shape, shared):
    N, M, O, K = shape
    g = torch.Generator().manual_seed(sum(shape))
    loc = torch.randn(O, K, dtype=torch.float64, generator=g).requires_grad_()
    scale = torch.rand(O, K, dtype=torch.float64, generator=g).requires_grad_()
    x = torch.randn((M, K) if shared else (N, M, K), dtype=torch.float64, generator=g).requires_grad_()
    seeds = torch.randint(-(2**63), 2**63 - 1, (N,), dtype=torch.int64, generator=g)
    y = rn.noise_linear(x, loc, scale, seeds, shared, "ieee")
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad(y, (x, loc, scale), gy)
    ref = _reference(x, loc, scale, seeds, shared)
    ref_grads = torch.autograd.grad(ref, (x, loc, scale), gy)
    assert_close(y, ref, msg="product")
    for name, a, b in zip(("input", "loc", "scale"), grads, ref_grads):
        assert_close(a, b, msg=f"gradient of the {name}")


def test_loops_without_masks_only_where_the_tiles_divide():
    tile = dict(zip(("BM", "BO", "BK"), rn._INTERPRETER_TILE))
    assert rn.even("forward", {"M": 32, "O": 16, "K": 48, **tile})
    assert not rn.even("forward", {"M": 37, "O": 16, "K": 48, **tile})
    assert not rn.even("grad_input", {"M": 32, "O": 6, "K": 48, **tile})
    assert not rn.even("weight_grad", {"O": 16, "K": 9, "BO": 16, "BK": 16})


@pytest.mark.parametrize("shared", [False, True])
def test_weight_gradients_in_chunks_equal_eager(shared, monkeypatch):
    """The weight gradients over five particles formed two at a time (chunks of 2, 2 and 1, each
    added to the last)."""
    N, M, O, K = 5, 7, 6, 10
    monkeypatch.setattr(rn, "CHUNK_BYTES", 2 * O * K * 8)
    g = torch.Generator().manual_seed(5)
    loc = torch.randn(O, K, dtype=torch.float64, generator=g).requires_grad_()
    scale = torch.rand(O, K, dtype=torch.float64, generator=g).requires_grad_()
    x = torch.randn((M, K) if shared else (N, M, K), dtype=torch.float64, generator=g).requires_grad_()
    seeds = torch.randint(-(2**63), 2**63 - 1, (N,), dtype=torch.int64, generator=g)
    gy = torch.randn(N, M, O, dtype=torch.float64, generator=g)
    y, ref = rn.noise_linear(x, loc, scale, seeds, shared, "ieee"), _reference(x, loc, scale, seeds, shared)
    assert_close(y, ref, msg="product")
    grads = torch.autograd.grad(y, (x, loc, scale), gy)
    ref_grads = torch.autograd.grad(ref, (x, loc, scale), gy)
    for name, a, b in zip(("input", "loc", "scale"), grads, ref_grads):
        assert_close(a, b, msg=f"gradient of the {name}")


def test_noise_is_a_function_of_seed_and_position():
    seeds = torch.tensor([7, 8, 7], dtype=torch.int64)
    eps = rn.weight_noise(seeds, (5, 9))
    assert torch.equal(eps[0], eps[2])
    assert not torch.equal(eps[0], eps[1])
    # a bigger weight holds the smaller one's noise where the counters agree (same row length)
    wider = rn.weight_noise(seeds[:1], (7, 9))
    assert torch.equal(wider[0, :5], eps[0])
    m1, m2 = rn.noise_moments(seeds, (5, 9), torch.float64)
    assert_close(m1, eps.double().sum(0), rtol=1e-6, atol=1e-6)
    assert_close(m2, (eps.double() ** 2).sum(0), rtol=1e-6, atol=1e-6)


def test_noise_is_standard_normal_and_independent():
    stats = pytest.importorskip("scipy.stats")
    eps = rn.weight_noise(rn.draw_seeds(16, CPU), (64, 64)).double()  # 65,536 draws
    flat = eps.flatten()
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    n = flat.numel()
    assert abs(flat.mean()) < 5 / math.sqrt(n)
    assert abs(flat.var() - 1) < 5 * math.sqrt(2 / n)
    # the four lanes of one Philox block, neighbouring rows, particles: uncorrelated
    for a, b in ((eps[..., 0::4], eps[..., 1::4]), (eps[..., 2::4], eps[..., 3::4]),
                 (eps[:, :-1], eps[:, 1:]), (eps[:-1], eps[1:])):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(r) < 5 / math.sqrt(a.numel()), float(r)


def test_bf16_products_are_close_to_float64():
    g = torch.Generator().manual_seed(0)
    loc, scale = torch.randn(24, 40, generator=g), torch.rand(24, 40, generator=g)
    x, seeds = torch.randn(3, 16, 40, generator=g), torch.randint(0, 2**62, (3,), generator=g)
    leaves = [t.requires_grad_() for t in (x, loc, scale)]
    low = rn.noise_linear(x, loc, scale, seeds, False, "bf16")
    gy = torch.randn(low.shape, generator=g)
    exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
    exact = _reference(*exact_leaves, seeds, False)
    pairs = [(low, exact), *zip(torch.autograd.grad(low, leaves, gy),
                                torch.autograd.grad(exact, exact_leaves, gy.double()))]
    for i, (a, b) in enumerate(pairs):  # the product, then the input's, mean's and scale's gradients
        err = (a.double() - b).norm() / b.norm()
        assert 1e-5 < err < 2e-2, (i, float(err))  # rounded (not silently fp32), to bf16's precision


def test_errors_say_what_was_expected():
    loc, scale, x = torch.zeros(3, 4), torch.ones(3, 4), torch.zeros(2, 5, 4)
    seeds = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="int64"):
        rn.noise_linear(x, loc, scale, seeds.float(), False, "ieee")
    with pytest.raises(ValueError, match="4 features"):
        rn.noise_linear(torch.zeros(2, 5, 3), loc, scale, seeds, False, "ieee")
    with pytest.raises(ValueError, match="precision"):
        rn.noise_linear(x, loc, scale, seeds, False, "fp8")
    with pytest.raises(ValueError, match="2\\*\\*31"):  # 32-bit offsets: refused, not overflowed
        rn.noise_linear(torch.zeros(1, 1, 4).expand(2**20, 2**10, 4), loc, scale, torch.zeros(2**20, dtype=torch.int64), False,
                        "ieee")
    # under the limit, accepted: the outputs (N, M, O) = (2**16, 1, 3) counted once, not N times
    big = torch.zeros(1, 1, 4).expand(2**16, 2**14, 4)
    rn._check(big[:, :1], loc, scale, torch.zeros(2**16, dtype=torch.int64))
    narrow = torch.zeros(1, 2**8)  # a shared input (M, K) is read once, not once per particle
    rn._check(torch.zeros(2**8, 2**8), narrow, narrow, torch.zeros(2**16, dtype=torch.int64))
    wide = torch.zeros(2**10, 1)
    with pytest.raises(ValueError, match=r"got \{'the outputs': 4294967296\}"):
        rn._check(torch.zeros(1, 1, 1).expand(2**16, 2**6, 1), wide, wide, torch.zeros(2**16, dtype=torch.int64))
    with pytest.raises(ValueError, match="shared"):
        torch.func.vmap(rn.noise_linear_particle, in_dims=(0, 0, None, 0, None))(
            x, torch.zeros(2, 3, 4), scale, seeds, "ieee")


# ---- MeanFieldVI ----------------------------------------------------------------------------------
NUM_DATA, BATCH = 40, 8


def _bnn(bayesian: str) -> BayesianModule:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    return BayesianModule(net, prior_scale="fan_in", bayesian=last_layer(net) if bayesian == "last" else None)


def _data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(BATCH, 4, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def _step(vi, noise):
    x, y = _data()
    optim = torch.optim.SGD(vi.parameters(), lr=0.0)
    loss = vi.step(optim, x, y, noise=noise)
    return float(loss), [p.grad.clone() for p in vi.parameters() if p.requires_grad]


def _noises(vi: MeanFieldVI, num: int, seed: int):
    """The regenerated run's noise (seeds for its Linear weights, draws for the rest) and the
    same noise written out for the stored run."""
    torch.manual_seed(seed)
    posterior, regenerated, stored = vi.posterior, [], []
    for name, loc in zip(posterior.names, posterior.locs):
        if name in posterior._layer_of:
            seeds = rn.draw_seeds(num, CPU)
            regenerated.append(seeds)
            stored.append(rn.weight_noise(seeds, tuple(loc.shape), loc.dtype))
        else:
            eps = torch.randn((num,) + loc.shape)
            regenerated.append(eps)
            stored.append(eps)
    return regenerated, stored


@pytest.mark.parametrize("kl", ["analytic", "sample"])
@pytest.mark.parametrize("bayesian", ["all", "last"])
def test_mean_field_step_equals_stored_noise_step(kl, bayesian):
    torch.set_default_dtype(torch.float64)
    kwargs = dict(num_particles=5, num_data=NUM_DATA, kl=kl, init_scale=0.1)
    fast = MeanFieldVI(_bnn(bayesian), weight_noise="regenerated", **kwargs)
    slow = MeanFieldVI(_bnn(bayesian), **kwargs)
    assert set(fast.posterior._layer_of) == {n for n in fast.posterior.names if n.endswith("weight")}
    regenerated, stored = _noises(fast, 5, seed=3)
    loss, grads = _step(fast, regenerated)
    ref_loss, ref_grads = _step(slow, stored)
    assert_close(loss, ref_loss, msg="loss")
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, msg="gradient")


def mesh_case(sample: int, data: int, gradient_sync: str = "bucketed"):
    """Runs on every rank (or in the test process with sample = data = 1): two steps (the first
    validates, the second reduces asynchronously) with this rank's share of pinned noise."""
    import pyro_sp

    torch.set_default_dtype(torch.float64)
    mesh = pyro_sp.SPMesh(sample=sample, data=data)
    vi = MeanFieldVI(_bnn("all"), num_particles=5, num_data=NUM_DATA, kl="sample", init_scale=0.1,
                     weight_noise="regenerated", mesh=mesh, gradient_sync=gradient_sync)
    lo, hi = mesh.particle_share(5)
    noise = [e[lo:hi] for e in _noises(vi, 5, seed=3)[0]]
    x, y = _data()
    x, y = x.tensor_split(data)[mesh.data_index], y.tensor_split(data)[mesh.data_index]
    optim = torch.optim.SGD(vi.parameters(), lr=0.0)
    out = []
    for _ in range(2):
        loss = vi.step(optim, x, y, noise=noise)
        out.append((float(loss), [p.grad.clone() for p in vi.parameters() if p.requires_grad]))
    return out


@pytest.mark.parametrize("sample, data, gradient_sync", [(2, 2, "bucketed"), (3, 1, "flat")])
def test_distributed_equals_one_process(pools, sample, data, gradient_sync):
    """The seeds ride in the particle shares like any noise: on a mesh (uneven shares 2 + 2 + 1
    included) the reduced loss and gradients are the one-process step's."""
    (ref_loss, ref_grads), _ = mesh_case(1, 1)
    for rank in pools(sample * data).run(mesh_case, sample, data, gradient_sync):
        for loss, grads in rank:
            assert_close(loss, ref_loss, msg="loss")
            for a, b in zip(grads, ref_grads):
                assert_close(a, b, msg="gradient")


# dynamo reads .grad of the scales (non-leaf tensors) that the traced vmap closes over
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_compiled_equals_eager():
    torch.set_default_dtype(torch.float64)
    results = []
    for compile_ in (False, True):
        vi = MeanFieldVI(_bnn("all"), num_particles=4, num_data=NUM_DATA, kl="sample",
                         weight_noise="regenerated", compile=compile_)
        results.append(_step(vi, _noises(vi, 4, seed=4)[0]))
    assert_close(results[1][0], results[0][0], msg="loss")
    for a, b in zip(results[1][1], results[0][1]):
        assert_close(a, b, msg="gradient")


def test_real_noise_loss_has_the_stored_estimators_mean():
    """The same estimator from another generator: over many draws, the mean losses agree."""
    x, y = _data()
    losses = {}
    for weight_noise in ("stored", "regenerated"):
        vi = MeanFieldVI(_bnn("all"), num_particles=2, num_data=NUM_DATA, kl="sample", init_scale=0.3,
                         weight_noise=weight_noise, seed=5)
        losses[weight_noise] = torch.tensor([vi.loss(x, y) for _ in range(30)], dtype=torch.float64)
    a, b = losses["stored"], losses["regenerated"]
    z = (a.mean() - b.mean()) / torch.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(z) < 4, float(z)
    assert 0.5 < b.std() / a.std() < 2


def test_steps_are_reproducible_and_train():
    x, y = _data()
    runs = []
    for _ in range(2):
        vi = MeanFieldVI(_bnn("all"), num_particles=2, num_data=NUM_DATA, weight_noise="regenerated", seed=0)
        optim = torch.optim.Adam(vi.parameters(), lr=0.05)
        runs.append([float(vi.step(optim, x, y)) for _ in range(6)])
    assert runs[0] == runs[1]
    assert runs[0][-1] < runs[0][0]


def test_layers_follow_torchs_fp32_matmul_setting(monkeypatch):
    """The layers' product precision follows torch's setting at each call (read outside compiled
    code, which cannot read it without a graph break), and the kernels get it."""
    x, y = _data()
    vi = MeanFieldVI(_bnn("all"), num_particles=2, num_data=NUM_DATA, weight_noise="regenerated", seed=0,
                     compile=True)
    layers = [m for m in vi.posterior.swapped.modules() if isinstance(m, rn.RegeneratedNoiseLinear)]
    seen = []
    forward = rn.noise_linear

    def recording(x, loc, scale, seeds, shared, precision):
        seen.append(precision)
        return forward(x, loc, scale, seeds, shared, precision)

    monkeypatch.setattr(rn, "noise_linear", recording)
    previous = torch.get_float32_matmul_precision()
    try:
        for setting, expected in (("highest", "ieee"), ("high", "tf32"), ("highest", "ieee")):
            torch.set_float32_matmul_precision(setting)
            seen.clear()
            vi.loss(x, y)  # the eager posterior
            assert [m.fp32_precision for m in layers] == [expected] * len(layers)
            assert seen and set(seen) == {expected}, (setting, seen)
            float(vi.loss_and_backward(x, y))  # the compiled step: recompiled on the change, no error
    finally:
        torch.set_float32_matmul_precision(previous)


def test_one_chunk_of_products_alive_at_a_time(monkeypatch):
    """The weight gradients' products are freed before the next chunk's are formed: at most
    CHUNK_BYTES of them at once."""
    import weakref

    N, M, O, K = 5, 3, 4, 8
    monkeypatch.setattr(rn, "CHUNK_BYTES", 2 * O * K * 4)  # chunks of 2, 2 and 1
    formed, alive_at_each = [], []
    real = rn._weight_products

    def recording(*args):
        alive_at_each.append(sum(ref() is not None for ref in formed))
        p = real(*args)
        formed.append(weakref.ref(p))
        return p

    monkeypatch.setattr(rn, "_weight_products", recording)
    x, loc, scale = torch.randn(N, M, K), torch.randn(O, K).requires_grad_(), torch.rand(O, K).requires_grad_()
    seeds = torch.arange(N, dtype=torch.int64)
    torch.autograd.grad(rn.noise_linear(x, loc, scale, seeds, False, "ieee").sum(), (loc, scale))
    assert alive_at_each == [0, 0, 0]


def test_bf16_weight_products_without_out_dtype(monkeypatch):
    """Where torch's mm/bmm take no ``out_dtype`` (older torch), the bf16 weight-gradient products
    are TF32 products of the same bf16 values: the same numbers; a shared input is converted once."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 5, 6, generator=g).bfloat16(), torch.randn(3, 6, 7, generator=g).bfloat16()
    real = torch.bmm

    def old_bmm(x, y, **kwargs):
        if kwargs:
            raise TypeError("bmm() got an unexpected keyword argument 'out_dtype'")
        return real(x, y)

    monkeypatch.setattr(torch, "bmm", old_bmm)
    monkeypatch.setattr(rn, "_OUT_DTYPE", True)
    p = rn._bf16_product(a, b)
    assert rn._OUT_DTYPE is False and p.dtype == torch.float32
    assert_close(p, a.double() @ b.double(), rtol=1e-6, atol=1e-6)
    seen = []
    monkeypatch.setattr(torch, "bmm", lambda x, y: seen.append(y.stride()) or real(x, y))
    shared = b[0].expand(3, 6, 7)  # a shared input: converted once, still a batch of stride 0
    assert_close(rn._bf16_product(a, shared), a.double() @ shared.double(), rtol=1e-6, atol=1e-6)
    assert seen == [(0, 7, 1)]


def test_fp32_setting_read_and_restored_in_either_api():
    """torch >= 2.9 refuses to read its old TF32 flag once the new one was set: the layers read the
    setting whichever API set it, and the weight-gradient products set it and restore it in the API
    it was read from."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has one API")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"  # the new API
        assert rn.fp32_matmul_precision() == "tf32"
        with rn._blas_precision("ieee"):
            assert rn.fp32_matmul_precision() == "ieee"
        assert matmul.fp32_precision == "tf32"
        matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision("high")  # the old API
        assert rn.fp32_matmul_precision() == "tf32"
        with rn._blas_precision("ieee"):
            pass
        assert matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"  # readable, restored
        # an inherited setting is left alone when it already holds, not written back (which would pin it)
        torch.set_float32_matmul_precision("highest")
        matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"
        with rn._blas_precision("tf32"):
            pass
        torch.backends.fp32_precision = "ieee"
        assert rn.fp32_matmul_precision() == "ieee"
    finally:
        torch.backends.fp32_precision = "none"
        torch.set_float32_matmul_precision("highest")
        matmul.fp32_precision = before


def test_mean_field_argument_errors():
    with pytest.raises(ValueError, match="weight_noise in"):
        MeanFieldVI(_bnn("all"), num_particles=2, weight_noise="fused")
    with pytest.raises(ValueError, match="estimator='exact'"):
        MeanFieldVI(_bnn("all"), num_particles=2, estimator="flipout", weight_noise="regenerated")
    biases_only = BayesianModule(nn.Linear(4, 3), bayesian=lambda name, value: name == "bias")
    with pytest.raises(ValueError, match="Linear layer with a Bayesian weight"):
        MeanFieldVI(biases_only, num_particles=2, weight_noise="regenerated")


# ---- the compiled kernels ------------------------------------------------------------------------
_SIGNATURES = {
    "forward_kernel": ("*fp32 *fp32 *fp32 *i64 *fp32" + " i32" * 11, ("BM", "BO", "BK"), {}),
    "grad_input_kernel": ("*fp32 *fp32 *fp32 *i64 *fp32" + " i32" * 11, ("BM", "BK", "BO"), {"SUM_PARTICLES": True}),
    # no PRECISION: its two cases compile ACCUMULATE's two branches instead (below)
    "weight_grad_kernel": ("*fp32 *i64 *fp32 *fp32" + " i32" * 5, ("BO", "BK"), {}),
}


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("name", sorted(_SIGNATURES))
def test_kernels_compile_for_hopper(name, precision, monkeypatch, tmp_path):
    """The kernels as the GPU runs them, compiled for sm_90 by Triton's own compiler (no GPU needed):
    the interpreter accepts code that the compiler refuses (module constants, for one). Compiled for
    real (an empty cache) after an interpreted launch in the same process, which must leave
    ``triton.language`` as it found it."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    rn.weight_noise(torch.zeros(1, dtype=torch.int64), (4, 4))  # an interpreted launch first
    import triton
    import triton.language as tl

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:  # pragma: no cover - another Triton layout
        pytest.skip("this Triton has no ASTSource/GPUTarget")
    kernel = getattr(rn.kernel_module(interpret=False), name)
    types, tiles, extra = _SIGNATURES[name]
    kind = name[: -len("_kernel")]
    if name == "weight_grad_kernel":
        extra = {"ACCUMULATE": precision == "tf32"}
    extra = {**extra, "EVEN": precision == "tf32"}  # the loops with and without masks
    constants = {**dict(zip(tiles, rn._CUDA_TILES[kind][0][:3])), **extra, "ROUNDS": rn.ROUNDS,
                 "PRECISION": precision, "ACC": tl.float32}
    names = list(kernel.arg_names)
    constants = {n: v for n, v in constants.items() if n in names}  # weight_grad has no PRECISION, ACC
    runtime = iter(types.split())
    signature = {n: "constexpr" if n in constants else next(runtime) for n in names}
    source = ASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm.get("cubin")


def test_missing_triton_is_an_import_error_at_construction(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)  # as if Triton were not installed
    with pytest.raises(ImportError, match="pip install triton"):
        MeanFieldVI(_bnn("all"), num_particles=2, weight_noise="regenerated")
    MeanFieldVI(_bnn("all"), num_particles=2)  # the stored noise needs no Triton


def _benchmark(name: str):
    """``benchmarks/NAME.py`` loaded as a module (its ``main`` not run)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_tiles_benchmark_launches_the_kernels_as_the_operators_do():
    """benchmarks/kernel_tiles.py times the kernels launched by hand, one tile at a time: its launches
    (run here in Triton's interpreter) give the operators' outputs."""
    kt = _benchmark("kernel_tiles")
    mod = rn.kernels(torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    N, M, O, K = 2, 20, 40, 72  # several tiles each way, the last ones partial
    loc = torch.randn(O, K, generator=g, dtype=torch.float64)
    scale = torch.rand(O, K, generator=g, dtype=torch.float64)
    seeds = torch.tensor([7, -2], dtype=torch.int64)
    gy = torch.randn(N, M, O, generator=g, dtype=torch.float64)
    for shared in (True, False):
        x = torch.randn((M, K) if shared else (N, M, K), generator=g, dtype=torch.float64)
        y = torch.empty(N, M, O, dtype=torch.float64)
        with rn._language_restored():
            kt.forward_launch(mod, (16, 16, 32, 4, 1), x, loc, scale, seeds, y, shared, "ieee")()
        assert_close(y, rn.noise_linear(x, loc, scale, seeds, shared, "ieee"), rtol=1e-12, atol=1e-12)
    gx = torch.empty(N, M, K, dtype=torch.float64)
    with rn._language_restored():
        kt.grad_input_launch(mod, (16, 32, 16, 4, 1), gy, loc, scale, seeds, gx, "ieee")()
    w = loc + scale * rn.weight_noise(seeds, (O, K), torch.float64)
    assert_close(gx, gy @ w, rtol=1e-12, atol=1e-12)


def test_kernel_sass_counts_the_main_loop(monkeypatch, tmp_path):
    """benchmarks/kernel_sass.py compiles a kernel for sm_90 (no GPU) and counts its main loop's
    instructions: the loop of the moments kernel draws 16 normals per thread per iteration (a 32 x 64
    tile, 4 warps), with Philox's multiplications among them."""
    import json

    pytest.importorskip("triton.compiler", reason="needs Triton's compiler")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    ks = _benchmark("kernel_sass")
    out = tmp_path / "sass.json"
    assert ks.main(["moments_kernel", "--tile", "32", "64", "--warps", "4", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["normals_per_thread_per_iteration"] == 16
    assert 100 < r["loop_instructions"] < 2000 and r["loop_opcodes"].get("IMAD.WIDE.U32", 0) >= 16
    # the loop is the longest backward branch
    text = "\n".join(["        /*0000*/                   MOV R1, c[0x0][0x28] ;",
                      "        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;",
                      "        /*0020*/                   IMAD R3, R2, R2, RZ ;",
                      "        /*0030*/              @P0 BRA 0x10 ;",
                      "        /*0040*/                   EXIT ;"])
    total, ops = ks.loop_counts(text)
    assert total == 3 and ops == {"IADD3": 1, "IMAD": 1, "BRA": 1}


def test_kernel_counters_summarizes_nsight_compute_csv(tmp_path):
    """benchmarks/kernel_counters.py --summarize groups Nsight Compute's CSV rows by kernel launch (after
    the tool's own log lines): each metric under its section, each rule's advice."""
    kc = _benchmark("kernel_counters")
    header = ('"ID","Kernel Name","Block Size","Grid Size","Section Name","Metric Name","Metric Unit",'
              '"Metric Value","Rule Name","Rule Description"\n')
    rows = ['"0","forward_kernel","256","1024","Occupancy","Achieved Occupancy","%","24.03","",""\n',
            '"0","forward_kernel","256","1024","Occupancy","","","","TheoreticalOccupancy","limited by registers"\n',
            '"1","sm90_xmma_gemm","384","132","Occupancy","Achieved Occupancy","%","17.82","",""\n']
    csv_path = tmp_path / "ncu.csv"
    csv_path.write_text("==PROF== Connected to process 1\n" + header + "".join(rows))
    kernels = kc.summarize(str(csv_path))["kernels"]
    assert [k["kernel"] for k in kernels] == ["forward_kernel", "sm90_xmma_gemm"]
    assert kernels[0]["metrics"] == {"Occupancy: Achieved Occupancy": "24.03 %"}  # the rule's row is no metric
    assert kernels[0]["rules"] == {"TheoreticalOccupancy": "limited by registers"}
    assert kernels[1]["grid"] == "132" and kernels[1]["rules"] == {}
