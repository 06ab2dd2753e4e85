# SPDX-License-Identifier: Apache-2.0
"""Per-GPU baselines for the Bayesian MLP of ``pyro-sp bench gpu-single``
(3072-2048-2048-10, batch 256, mean-field Normal guide with softplus scales,
N(0, 1) priors, vectorized particles): the same estimator written in raw
PyTorch (eager and ``torch.compile``) and in NumPyro (``jit``). Not a test;
writes JSON. Steps are timed by :mod:`pyro_sp.bench.timing`.

    python benchmarks/gpu_peers.py torch --particles 8 32 64 --out torch.json
    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/gpu_peers.py numpyro --particles 8 32 64 --out numpyro.json
    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/gpu_peers.py numpyro --pmap --particles 16 64 --out numpyro_pmap.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyro_sp.bench import write_result
from pyro_sp.bench.timing import step_times, timed

SIZES = (3072, 2048, 2048, 10)
BATCH = 256


def torch_suite(args) -> dict:
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(BATCH, SIZES[0], generator=g).to(device)
    y = torch.randint(0, SIZES[-1], (BATCH,), generator=g).to(device)
    shapes = [s for a, b in zip(SIZES[:-1], SIZES[1:]) for s in ((a, b), (b,))]
    locs = [torch.zeros(s, device=device, requires_grad=True) for s in shapes]
    rhos = [torch.full(s, math.log(math.expm1(0.01)), device=device, requires_grad=True) for s in shapes]
    optim = torch.optim.Adam(locs + rhos, lr=1e-3, **({"fused": True} if args.fused_adam else {}))
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def layer(h, n: int, i: int, noise_dtype=torch.float32):
        """Layer ``i // 2``'s output for the input ``h`` and its weights' ``log p - log q`` (``noise_dtype``:
        the dtype the noise is drawn and kept in; the rest in fp32)."""
        log_w, sampled = 0.0, []
        for j in (i, i + 1):
            scale = F.softplus(rhos[j])
            eps = torch.randn((n,) + shapes[j], device=device, dtype=noise_dtype)
            z = locs[j] + scale * eps
            log_q = (-0.5 * eps**2 - scale.log() - half_log_2pi).flatten(1).sum(-1)
            log_p = (-0.5 * z**2 - half_log_2pi).flatten(1).sum(-1)
            log_w = log_w + log_p - log_q
            sampled.append(z)
        w, b = sampled
        h = h @ (w / math.sqrt(shapes[i][0])) + b.unsqueeze(-2)
        return (torch.relu(h) if i < len(shapes) - 2 else h), log_w

    def loss_fn(n: int, recompute: bool = False, noise_dtype=torch.float32):
        h, log_w = x, 0.0
        for i in range(0, len(shapes), 2):
            if recompute:  # nothing of the layer kept for backward but its input: drawn again there
                h, lw = torch.utils.checkpoint.checkpoint(layer, h, n, i, use_reentrant=False,
                                                          preserve_rng_state=True)
            else:
                h, lw = layer(h, n, i, noise_dtype)
            log_w = log_w + lw
        log_lik = -F.cross_entropy(h.flatten(0, 1), y.repeat(n), reduction="none").view(n, -1).sum(-1)
        return -(log_lik + log_w).mean()

    def step(fn, n):
        optim.zero_grad(set_to_none=True)
        fn(n).backward()
        optim.step()

    compiled = torch.compile(loss_fn, dynamic=False)

    def recompute_difference(fn, n: int) -> float | str:
        """The largest relative difference of the gradients with and without the recomputation,
        from the same random state (0 when backward draws the same weights again)."""
        grads = []
        for recompute in (False, True):
            torch.manual_seed(0)
            try:
                grads.append(torch.autograd.grad(fn(n, recompute=recompute), locs + rhos))
            except Exception as e:  # noqa: BLE001 - recorded with the timings
                return _error(e)
        return max(float((a - b).norm() / a.norm().clamp_min(1e-30)) for a, b in zip(*grads))

    about = {"suite": "raw_torch", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
             "tf32": args.tf32, "fused_adam": args.fused_adam}
    rows = []
    for n in args.particles:
        row = {"particles": n}
        for name, fn in (("raw_torch_eager", loss_fn), ("raw_torch_compile", compiled)):
            row[name] = timed(functools.partial(step, fn, n), warmup=args.warmup, steps=args.steps, device=device,
                              back_to_back=args.back_to_back)
        if args.checkpoint:
            row["checkpoint_gradient_difference"] = {"eager": recompute_difference(loss_fn, n),
                                                     "compile": recompute_difference(compiled, n)}
            for name, fn in (("raw_torch_checkpoint_eager", loss_fn), ("raw_torch_checkpoint_compile", compiled)):
                try:
                    row[name] = timed(functools.partial(step, functools.partial(fn, recompute=True), n),
                                      warmup=args.warmup, steps=args.steps, device=device)
                except Exception as e:  # noqa: BLE001 - recorded: whether compile takes the recomputation
                    row[name] = _error(e)
        if args.bf16_noise:  # the noise drawn and kept for backward in bf16, the weights formed from it in fp32
            row["raw_torch_bf16_noise_compile"] = timed(
                functools.partial(step, functools.partial(compiled, noise_dtype=torch.bfloat16), n),
                warmup=args.warmup, steps=args.steps, device=device, back_to_back=args.back_to_back)
        if args.gemm:
            for dtype in (torch.float32, torch.bfloat16):
                row[f"gemm_bound_{'bf16' if dtype == torch.bfloat16 else 'fp32'}"] = timed(
                    gemm_bound(n, device, dtype), warmup=args.warmup, steps=args.steps, device=device)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_result(args.out, {**about, "rows": rows}, partial=True)
    return {**about, "rows": rows}


def gemm_bound(n: int, device, dtype):
    """The step's own matrix products and nothing else: per layer, the forward ``x W`` and both
    backward products (``g W^T``, ``x^T g``) of ``n`` independent weight sets, no sampling, no
    elementwise work (the first layer's input gradient included, as a network inside would need it).
    What any exact estimator's step costs at least."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    tensors = []
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        x, w, gy = (torch.randn(s, generator=g).to(device, dtype) for s in ((n, BATCH, a), (n, a, b), (n, BATCH, b)))
        tensors.append((x, w, gy))

    def step():
        for x, w, gy in tensors:
            torch.bmm(x, w)
            torch.bmm(gy, w.transpose(1, 2))
            torch.bmm(x.transpose(1, 2), gy)

    return step


def pmap_of_vmap(fn, keys):
    """NumPyro's particles over the GPUs of this process (a ``vectorize_particles`` callable): pmap of vmap."""
    import jax

    d = jax.local_device_count()
    out = jax.pmap(jax.vmap(fn))(keys.reshape((d, keys.shape[0] // d) + keys.shape[1:]))
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), out)


def timed_updates(update, state, args, warmup: int, steps: int):
    """``warmup`` untimed, then ``steps`` timed calls of a jitted SVI ``update``:
    ``(state, loss, seconds per timed step)``."""
    import jax

    now = {"state": state, "loss": None}

    def step():
        now["state"], now["loss"] = update(now["state"], *args)
        return now["loss"]

    times, _ = step_times(step, warmup=warmup, steps=steps, wait=jax.block_until_ready)
    return now["state"], now["loss"], times


def jax_peak() -> dict:
    """``{"peak_gib": ...}`` of the first JAX device, where the backend reports it (since start-up)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {"peak_gib": stats["peak_bytes_in_use"] / 2**30} if "peak_bytes_in_use" in stats else {}


def numpyro_suite(args) -> dict:
    import jax
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (BATCH, SIZES[0]))
    y = jax.random.randint(key, (BATCH,), 0, SIZES[-1])

    def model(x, y):
        h = x
        for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
            w = numpyro.sample(f"w{i}", dist.Normal(0.0, 1.0).expand([a, b]).to_event(2))
            bias = numpyro.sample(f"b{i}", dist.Normal(0.0, 1.0).expand([b]).to_event(1))
            h = h @ (w / math.sqrt(a)) + bias
            if i < len(SIZES) - 2:
                h = jax.nn.relu(h)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Categorical(logits=h), obs=y)

    strategy = pmap_of_vmap if args.pmap else True
    about = {"suite": "numpyro", "device": str(jax.devices()[0]), "numpyro": numpyro.__version__}
    rows = []
    for n in args.particles:
        svi = SVI(model, AutoNormal(model, init_scale=0.01), numpyro.optim.Adam(1e-3),
                  Trace_ELBO(num_particles=n, vectorize_particles=strategy))
        state = svi.init(key, x, y)
        update = jax.jit(svi.update)
        state, loss = timed_updates(update, state, (x, y), args.warmup, 0)[:2]
        _, _, times = timed_updates(update, state, (x, y), 0, args.steps)
        name = f"numpyro_pmap_{jax.local_device_count()}_gpus" if args.pmap else "numpyro_jit"
        row = {"particles": n, name: {"step_ms_median": 1e3 * statistics.median(times), **jax_peak()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_result(args.out, {**about, "rows": rows}, partial=True)
    return {**about, "rows": rows}


def _error(e: Exception) -> str:
    """A failure recorded in a row in place of its numbers."""
    return f"{type(e).__name__}: {str(e)[:300]}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=("torch", "numpyro"))
    p.add_argument("--particles", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pmap", action="store_true", help="numpyro: particles over all local GPUs (pmap of vmap)")
    p.add_argument("--out", default=None)
    p.add_argument("--tf32", action="store_true", help="torch: TF32 matmuls (default: full fp32)")
    p.add_argument("--fused-adam", action="store_true", help="torch: torch.optim.Adam(fused=True)")
    p.add_argument("--checkpoint", action="store_true",
                   help="torch: also the step with each layer under torch.utils.checkpoint (weights drawn "
                        "again in backward from the saved random state, none kept)")
    p.add_argument("--bf16-noise", action="store_true",
                   help="torch: also the compiled step with the noise drawn and kept in bf16 (the weights and "
                        "everything else in fp32)")
    p.add_argument("--gemm", action="store_true", help="torch: also time the step's bare matrix products")
    p.add_argument("--back-to-back", type=int, default=0, metavar="ROUNDS",
                   help="torch: also time ROUNDS rounds of --steps steps synchronised once per round "
                        "(step_ms_back_to_back), as pyro-sp bench gpu-single --back-to-back")
    args = p.parse_args()
    if args.back_to_back < 0 or (args.back_to_back and args.suite != "torch"):
        p.error(f"expected --back-to-back ROUNDS >= 1 with the suite 'torch' only, got {args.back_to_back} "
                f"with {args.suite!r}")
    result = torch_suite(args) if args.suite == "torch" else numpyro_suite(args)
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
