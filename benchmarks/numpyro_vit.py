# SPDX-License-Identifier: Apache-2.0
"""NumPyro peer of the Bayesian ViT-small benchmark: the network of
``pyro_sp.bench.models.ViTSmall`` (3 x 32 x 32 images, patch 4, 64 tokens,
width 192, 6 pre-norm blocks of 3 heads, MLP 384, exact-erf GELU, mean
pooling, batch 128, synthetic data) with every parameter a latent site of a
Normal prior (scale ``1/sqrt(fan_in)`` for weight matrices, 1 for biases,
LayerNorm parameters and the positional embedding), ``AutoNormal`` guide
(``init_scale=0.01``), ``Trace_ELBO`` with vectorized particles, Adam(1e-3),
``jax.jit(svi.update)`` timed per step. Not a test; writes JSON.

The patch embedding (PyTorch: Conv2d 3 -> 192, kernel 4, stride 4) is written
as a reshape into 64 patches of 48 values, ordered (channel, row, column) like
the flattened conv weight, and a matmul with a (48, 192) weight: the same
FLOPs, and the same function when that weight is the conv weight reshaped.
Weight matrices are stored (in, out), the transpose of ``nn.Linear.weight``.

``--pmap`` spreads the particles over all local GPUs (pmap of vmap, as in
``gpu_peers.py``); N must be a multiple of the GPU count. ``peak_gib`` is
device 0's peak of the process so far (JAX has no public reset), so give the
particle counts in ascending order. ``--tiny`` is a network small enough for a
CPU run in seconds (image 8, width 16, depth 1, 2 heads, MLP 32, batch 4).

Examples::

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/numpyro_vit.py --particles 8 32 64 --out vit_numpyro.json
    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/numpyro_vit.py --pmap --particles 16 64 --out vit_numpyro_pmap.json
    python benchmarks/numpyro_vit.py --tiny --particles 2 4 --warmup 1 --steps 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu_peers import jax_peak, pmap_of_vmap, timed_updates  # noqa: E402

FULL = dict(image=32, patch=4, dim=192, depth=6, heads=3, hidden=384, classes=10, batch=128)
TINY = dict(image=8, patch=4, dim=16, depth=1, heads=2, hidden=32, classes=10, batch=4)
LN_EPS = 1e-5  # torch.nn.LayerNorm's default


def param_specs(cfg: dict) -> list:
    """``(name, shape, fan_in)`` of every parameter, with the names and in the order of
    ``ViTSmall().state_dict()``; ``fan_in`` is None where the prior scale is 1."""
    d, h, p = cfg["dim"], cfg["hidden"], cfg["patch"]
    tokens, patch_len = (cfg["image"] // p) ** 2, 3 * p * p

    def linear(name, a, b):
        return [(f"{name}.weight", (a, b), a), (f"{name}.bias", (b,), None)]

    def norm(name):
        return [(f"{name}.weight", (d,), None), (f"{name}.bias", (d,), None)]

    specs = [("pos", (1, tokens, d), None)] + linear("embed", patch_len, d)
    for i in range(cfg["depth"]):
        b = f"blocks.{i}"
        specs += norm(f"{b}.ln1") + linear(f"{b}.qkv", d, 3 * d) + linear(f"{b}.proj", d, d)
        specs += norm(f"{b}.ln2") + linear(f"{b}.fc1", d, h) + linear(f"{b}.fc2", h, d)
    return specs + norm("norm") + linear("head", d, cfg["classes"])


def vit_forward(params: dict, x, cfg: dict):
    """Logits (B, classes) of the ViT for images ``x`` (B, 3, H, W); ``params``
    maps the names of ``param_specs`` to arrays of its shapes."""
    import jax
    import jax.numpy as jnp

    p, heads = cfg["patch"], cfg["heads"]
    b, c, hh, ww = x.shape
    patches = x.reshape(b, c, hh // p, p, ww // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, (hh // p) * (ww // p), c * p * p)

    def linear(name, v):
        return v @ params[f"{name}.weight"] + params[f"{name}.bias"]

    def layer_norm(name, v):
        mu = v.mean(-1, keepdims=True)
        var = jnp.square(v - mu).mean(-1, keepdims=True)
        return (v - mu) * jax.lax.rsqrt(var + LN_EPS) * params[f"{name}.weight"] + params[f"{name}.bias"]

    h = linear("embed", patches) + params["pos"]
    _, t, d = h.shape
    dh = d // heads
    for i in range(cfg["depth"]):
        blk = f"blocks.{i}"
        qkv = linear(f"{blk}.qkv", layer_norm(f"{blk}.ln1", h)).reshape(b, t, 3, heads, dh)
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))  # (B, heads, T, dh)
        att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / math.sqrt(dh), axis=-1)
        a = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        h = h + linear(f"{blk}.proj", a)
        h = h + linear(f"{blk}.fc2", jax.nn.gelu(linear(f"{blk}.fc1", layer_norm(f"{blk}.ln2", h)), approximate=False))
    return linear("head", layer_norm("norm", h).mean(1))


def _import_jax():
    try:
        import jax
        import numpyro
    except ImportError as e:
        print(f"numpyro_vit.py needs JAX and NumPyro ({e}): pip install numpyro jax", file=sys.stderr)
        sys.exit(2)
    return jax, numpyro


def _out_of_memory(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def numpyro_suite(args) -> dict:
    jax, numpyro = _import_jax()
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    cfg = TINY if args.tiny else FULL
    specs = param_specs(cfg)
    kx, ky, kinit = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (cfg["batch"], 3, cfg["image"], cfg["image"]))
    y = jax.random.randint(ky, (cfg["batch"],), 0, cfg["classes"])

    def model(x, y):
        params = {}
        for name, shape, fan_in in specs:
            scale = 1.0 if fan_in is None else 1.0 / math.sqrt(fan_in)
            params[name] = numpyro.sample(name, dist.Normal(0.0, scale).expand(shape).to_event(len(shape)))
        logits = vit_forward(params, x, cfg)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Categorical(logits=logits), obs=y)

    strategy = pmap_of_vmap if args.pmap else True
    name = f"numpyro_pmap_{jax.local_device_count()}_gpus" if args.pmap else "numpyro_jit"
    n_params = sum(math.prod(s) for _, s, _ in specs)
    print(f"ViT {'tiny' if args.tiny else 'small'}: {n_params} parameters, {len(specs)} latent sites, "
          f"batch {cfg['batch']}, {jax.devices()[0]}", flush=True)
    rows = []
    for n in args.particles:
        row = {"particles": n}
        if args.pmap and n % jax.local_device_count():
            row[name] = f"particles not a multiple of {jax.local_device_count()} devices"
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        state = update = loss = None
        try:
            svi = SVI(model, AutoNormal(model, init_scale=0.01), numpyro.optim.Adam(1e-3),
                      Trace_ELBO(num_particles=n, vectorize_particles=strategy))
            t0 = time.perf_counter()
            state = svi.init(kinit, x, y)
            jax.block_until_ready(state)
            init_s = time.perf_counter() - t0
            update = jax.jit(svi.update)
            state, _, (first,) = timed_updates(update, state, (x, y), 0, 1)
            state = timed_updates(update, state, (x, y), args.warmup, 0)[0]
            state, loss, times = timed_updates(update, state, (x, y), 0, args.steps)
            row[name] = {"step_ms_median": 1e3 * statistics.median(times), "init_s": init_s,
                         "first_step_s": first, "loss": float(loss), **jax_peak()}
        except Exception as e:  # XlaRuntimeError / JaxRuntimeError, whose name moved between versions
            if not _out_of_memory(e):
                raise
            row[name] = "out of memory"
        del state, update, loss
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"suite": "numpyro_vit", "device": jax.devices()[0].device_kind, "devices": jax.local_device_count(),
            "numpyro": numpyro.__version__, "jax": jax.__version__, "config": cfg, "parameters": n_params,
            "rows": rows}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pmap", action="store_true", help="particles over all local GPUs (pmap of vmap)")
    p.add_argument("--tiny", action="store_true", help="a tiny ViT and batch, for a CPU run in seconds")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = numpyro_suite(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
