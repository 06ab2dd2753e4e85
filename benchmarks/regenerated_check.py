# SPDX-License-Identifier: Apache-2.0
"""The regenerated-noise kernels (pyro_sp.nn.regenerated_noise) checked on a CUDA device
against eager float64 PyTorch on the same noise (the seeds' noise written out), on the
Bayesian MLP's layer shapes (3072-2048-2048-10, batch 256): the relative error
(Frobenius norm) of the product and of the three gradients, per input precision. Also the
noise the compiled kernels draw against the noise Triton's interpreter draws on the CPU
for the same seeds. Before those, the time of the forward and backward on those shapes
(CUDA events, median of 20; the backward also with other particle chunks, ``--chunk-mib``)
next to the bare ``torch.bmm`` products they replace, and the time to draw the noise alone
(the moments kernel: N O K normals drawn, 2 O K numbers written); after them the ViT-small's
layer shapes (``--vit``) and bf16 products (``--bf16``). Not a test: writes JSON.

    python benchmarks/regenerated_check.py --particles 32 --chunk-mib 32 64 1024 --vit --bf16 --out check.json
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from pyro_sp.bench import write_result
from pyro_sp.bench.timing import timed
from pyro_sp.nn import regenerated_noise as rn

SIZES = (3072, 2048, 2048, 10)
BATCH = 256


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def layer_errors(n: int, k: int, o: int, shared: bool, device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(k + o)
    loc = (0.05 * torch.randn(o, k, generator=g)).to(device).requires_grad_()
    scale = (0.01 + 0.02 * torch.rand(o, k, generator=g)).to(device).requires_grad_()
    x = torch.randn((BATCH, k) if shared else (n, BATCH, k), generator=g).to(device).requires_grad_()
    seeds = torch.randint(-(2**63), 2**63 - 1, (n,), dtype=torch.int64, generator=g).to(device)
    gy = torch.randn(n, BATCH, o, generator=g).to(device)
    leaves = (loc, scale) if shared else (x, loc, scale)
    # the float64 reference on the same noise
    eps = rn.weight_noise(seeds, (o, k)).double()
    loc64, scale64 = loc.detach().double().requires_grad_(), scale.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    ref = torch.einsum("mk,nok->nmo" if shared else "nmk,nok->nmo", x64, loc64 + scale64 * eps)
    ref_grads = torch.autograd.grad(ref, (loc64, scale64) if shared else (x64, loc64, scale64), gy.double())
    out = {"shape": {"particles": n, "batch": BATCH, "in": k, "out": o, "shared_input": shared}}
    for precision in ("ieee", "tf32", "bf16"):
        y = rn.noise_linear(x, loc, scale, seeds, shared, precision)
        grads = torch.autograd.grad(y, leaves, gy)
        names = ("loc", "scale") if shared else ("input", "loc", "scale")
        out[precision] = {"output": _relative(y, ref),
                          **{f"grad_{nm}": _relative(a, b) for nm, a, b in zip(names, grads, ref_grads)}}
    return out


def median_ms(fn) -> float:
    """Milliseconds per call of ``fn``: CUDA events, median of 20 after 3 untimed calls."""
    return timed(fn, warmup=3, steps=20, device=torch.device("cuda"), events=True)["step_ms_median"]


#: the ViT-small's Linear layers (out, in) with its rows per particle (batch 128 x 64 tokens)
VIT_LAYERS = ((576, 192), (192, 192), (384, 192), (192, 384))
VIT_ROWS = 128 * 64


def layer_times(n: int, k: int, o: int, shared: bool, device, precision: str, batch: int = BATCH,
                chunks_mib=()) -> dict:
    """Milliseconds per call of the forward and the backward, of the noise alone, and of the bmm
    products they replace; ``backward_chunk<C>MiB``: the backward with the weight-gradient products
    formed at most ``C`` MiB at a time (``CHUNK_BYTES``; the default is ``backward``'s)."""
    loc = torch.zeros(o, k, device=device)
    scale = torch.full((o, k), 0.01, device=device)
    x = torch.randn((batch, k) if shared else (n, batch, k), device=device)
    seeds = torch.arange(n, dtype=torch.int64, device=device)
    gy = torch.randn(n, batch, o, device=device)
    xb = x.expand(n, batch, k) if shared else x
    w = torch.randn(n, o, k, device=device)

    def backward():
        return rn.noise_linear_backward(gy, x, loc, scale, seeds, shared, precision, not shared)

    times = {"forward": median_ms(lambda: rn.noise_linear(x, loc, scale, seeds, shared, precision)),
             "backward": median_ms(backward)}
    default = rn.CHUNK_BYTES
    try:
        for mib in chunks_mib:
            rn.CHUNK_BYTES = mib * 2**20
            times[f"backward_chunk{mib}MiB"] = median_ms(backward)
    finally:
        rn.CHUNK_BYTES = default
    return {
        "shape": {"particles": n, "rows": batch, "in": k, "out": o, "shared_input": shared},
        **times,
        "noise_moments": median_ms(lambda: rn.noise_moments(seeds, (o, k))),
        "bmm_forward": median_ms(lambda: torch.bmm(xb, w.transpose(1, 2))),
        "bmm_backward": median_ms(lambda: (torch.bmm(gy, w), torch.bmm(gy.transpose(1, 2), xb))),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", type=int, default=32)
    p.add_argument("--chunk-mib", type=int, nargs="*", default=[],
                   help="also time the backward with these CHUNK_BYTES (MiB)")
    p.add_argument("--vit", action="store_true", help="also time the ViT-small's layer shapes")
    p.add_argument("--vit-particles", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="also time the layers with bf16 products")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def save(**parts):  # after each part: a time limit keeps what was measured
        result.update(parts)
        print(parts, flush=True)
        write_result(args.out, result, partial=True)

    torch.set_float32_matmul_precision("high")
    layers = list(enumerate(itertools.pairwise(SIZES)))
    save(times_ms={"tf32": [layer_times(args.particles, k, o, i == 0, device, "tf32", chunks_mib=args.chunk_mib)
                            for i, (k, o) in layers]})
    seeds = torch.tensor([0, 1, -5, 2**62], dtype=torch.int64)
    on_gpu = rn.weight_noise(seeds.to(device), (33, 70)).cpu()
    on_cpu = rn.weight_noise(seeds, (33, 70))
    save(noise={"max_abs_difference_gpu_vs_interpreter": float((on_gpu - on_cpu).abs().max()),
                "max_abs_noise": float(on_cpu.abs().max())})
    save(layers=[layer_errors(args.particles, k, o, i == 0, device) for i, (k, o) in layers])
    if args.vit:
        save(vit_times_ms={"tf32": [layer_times(args.vit_particles, k, o, False, device, "tf32", VIT_ROWS)
                                    for o, k in VIT_LAYERS]})
    if args.bf16:
        save(bf16_times_ms=[layer_times(args.particles, k, o, i == 0, device, "bf16") for i, (k, o) in layers])
    write_result(args.out, result)


if __name__ == "__main__":
    main()
