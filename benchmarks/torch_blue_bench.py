# SPDX-License-Identifier: Apache-2.0
"""Step time and peak memory of the paper's own BNN library, ``torch_blue``
(PyPI ``torch-blue``, 1.1.0), on the networks of our benchmarks, for a side by
side comparison in BENCHMARKS.md (not a test; writes JSON).

Only torch_blue's public API is used: ``VIModule``, ``VILinear``, ``VIConv2d``,
``VISequential``, ``distributions.MeanFieldNormal`` (variational distribution
and prior), ``distributions.Categorical`` and ``KullbackLeiblerLoss`` (or, with
``--loss analytical``, ``AnalyticalKullbackLeiblerLoss``). A torch_blue model
draws N weight samples per forward pass when called as ``model(x, samples=N)``
(vectorized with ``torch.vmap``); its output has a leading sample axis and
carries the sampled weights' log-probabilities, which the loss consumes.

Networks (``pyro_sp.bench.models``): ``mlp`` 3072-2048-2048-10, ReLU, batch
256; ``vit`` the ``ViTSmall`` of CIFAR-10 shapes (patch-4 convolution to width
192, learned positional embedding, 6 pre-norm blocks of 3 heads with
``scaled_dot_product_attention``, MLP 384, GELU, final LayerNorm, mean pooling,
head 10), batch 128. Every Linear and Conv2d is Bayesian (mean-field Normal,
prior N(0, 1/fan_in) on weights and N(0, 1) on biases); torch_blue has no
Bayesian LayerNorm or embedding, so the LayerNorms and the positional embedding
stay deterministic (the JSON's "notes" say so). Data: a fixed synthetic batch.
The ViT's attention (``--attention``) is by default ``scaled_dot_product_attention``
on its MATH backend: under torch_blue's ``torch.vmap`` the backward of the CUDA
memory-efficient kernel fails in torch 2.11 ("LSE is not correctly aligned
(strideH)"), and torch_blue's own ``VIMultiheadAttention`` (``--attention mha``)
computes explicit softmax attention as well.

Suites
------
``single``  one process: for each N, the median step time over ``--steps``
            steps after ``--warmup`` (:mod:`pyro_sp.bench.timing`: CUDA
            synchronised around each step) and, on CUDA, the peak memory of the timed steps. A step is
            ``zero_grad; loss = KL-loss(model(x, samples=N), y);
            loss.backward(); Adam(lr 1e-3).step()``. Out-of-memory is recorded
            per N.
``paper``   the paper's sampling parallelism, under torchrun: the torch_blue
            model wrapped in ``torch.nn.parallel.DistributedDataParallel``,
            every rank the full batch and its own N particles (weak scaling:
            N x world in total), a different sampling seed per rank; NCCL on
            CUDA, gloo on CPU. The step time of a step is the slowest rank's;
            rank 0 writes the JSON.

DDP gradient-averaging caveat (``paper``): DDP *averages* the ranks'
gradients. For a loss that is a mean over particles this is the gradient of an
N x world-particle estimate, and that holds for torch_blue's KL term. But
torch_blue's ``Categorical`` data term is ``log(mean over samples of
softmax)``, which is not a mean over particles: the average of the ranks'
N-sample terms is not the N x world-sample term one process would compute, so
the weak-scaling runs optimise a (slightly looser) different objective than a
single process with all the particles, and the loss each rank sees is its own,
not the global one. (DDP also broadcasts rank 0's initial parameters, so only
the weight noise differs between ranks.) The timings are unaffected.

Examples::

    python benchmarks/torch_blue_bench.py single --model mlp --particles 8 32 64 --device cuda --out x.json
    python benchmarks/torch_blue_bench.py single --model vit --particles 8 32 --tf32 --out vit.json
    torchrun --nproc-per-node 2 benchmarks/torch_blue_bench.py paper --model mlp --per-gpu 8 32 --out y.json
    OMP_NUM_THREADS=1 python benchmarks/torch_blue_bench.py single --model vit --tiny --device cpu --particles 2 4

Requires ``pip install torch-blue==1.1.0`` (imported only when a benchmark
runs, so this module imports without it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TORCH_BLUE_VERSION", "build_model", "run_paper", "run_single"]

TORCH_BLUE_VERSION = "1.1.0"  # the version these benchmarks were written against
LR = 1e-3
TINY_MLP_SIZES = (64, 32, 32, 10)
TINY_MLP_BATCH = 16
TINY_VIT = dict(image=8, patch=4, dim=16, depth=1, heads=2, hidden=32)
TINY_VIT_BATCH = 4
TINY_WARMUP, TINY_STEPS = 1, 2


def _import_blue():
    """torch_blue's ``vi`` package, or an ImportError that says how to install it."""
    try:
        import torch_blue
        from torch_blue import vi
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"torch_blue is not installed: pip install torch-blue=={TORCH_BLUE_VERSION}"
        ) from e
    if getattr(torch_blue, "__version__", None) != TORCH_BLUE_VERSION:
        warnings.warn(
            f"torch_blue {getattr(torch_blue, '__version__', '?')} is installed; these benchmarks "
            f"were written against {TORCH_BLUE_VERSION}",
            stacklevel=2,
        )
    return torch_blue, vi


def _bench_models():
    """``pyro_sp.bench.models`` (shapes and synthetic data), also from a source checkout."""
    try:
        from pyro_sp.bench import models
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from pyro_sp.bench import models
    return models


# --------------------------------------------------------------------------- networks


def _priors(distributions, fan_in: int, bias: bool = True):
    """One prior per random variable (weight, bias): N(0, 1/fan_in) and N(0, 1)."""
    weight = distributions.MeanFieldNormal(mean=0.0, std=fan_in**-0.5)
    return [weight, distributions.MeanFieldNormal(mean=0.0, std=1.0)] if bias else [weight]


def _blue_mlp(vi, sizes):
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(vi.VILinear(a, b, prior=_priors(vi.distributions, a)))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return vi.VISequential(*layers)


ATTENTION = ("sdpa-math", "sdpa", "mha")


def _blue_vit(vi, image=32, patch=4, dim=192, depth=6, heads=3, hidden=384, classes=10, attention="sdpa-math"):
    """``pyro_sp.bench.models.ViTSmall`` from torch_blue layers (a VIModule per block).

    ``attention``: "sdpa-math" VILinear qkv and proj around
    ``F.scaled_dot_product_attention`` on its MATH backend; "sdpa" the same
    with PyTorch's default backend choice (on CUDA, fp32, that is the
    memory-efficient kernel, whose backward under ``torch.vmap`` fails in
    torch 2.11: "LSE is not correctly aligned (strideH)"); "mha" torch_blue's
    own ``VIMultiheadAttention`` (in_proj 192 -> 576 and out_proj, the same
    parameters; explicit softmax attention, need_weights=True).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    d = vi.distributions
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention {attention!r}: one of {ATTENTION}")

    def linear(a, b):
        return vi.VILinear(a, b, prior=_priors(d, a))

    class Block(vi.VIModule):
        def __init__(self) -> None:
            super().__init__()
            self.heads = heads
            self.ln1 = nn.LayerNorm(dim)
            if attention == "mha":  # priors N(0, 1) rescaled by 1/sqrt(fan_in): one prior for all its variables
                self.attn = vi.VIMultiheadAttention(dim, heads, batch_first=True, rescale_prior=True)
            else:
                self.qkv = linear(dim, 3 * dim)
                self.proj = linear(dim, dim)
            self.ln2 = nn.LayerNorm(dim)
            self.fc1 = linear(dim, hidden)
            self.fc2 = linear(hidden, dim)

        def forward(self, x):  # one weight sample: torch_blue vmaps over the samples
            b, t, e = x.shape
            h = self.ln1(x)
            if attention == "mha":
                x = x + self.attn(h, h, h)[0]
            else:
                q, k, v = self.qkv(h).reshape(b, t, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
                if attention == "sdpa-math":
                    with sdpa_kernel(SDPBackend.MATH):
                        a = F.scaled_dot_product_attention(q, k, v)
                else:
                    a = F.scaled_dot_product_attention(q, k, v)
                x = x + self.proj(a.transpose(1, 2).reshape(b, t, e))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    class ViT(vi.VIModule):
        def __init__(self) -> None:
            super().__init__()
            self.embed = vi.VIConv2d(3, dim, kernel_size=patch, stride=patch, prior=_priors(d, 3 * patch * patch))
            self.pos = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2, dim))  # deterministic
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.norm = nn.LayerNorm(dim)
            self.head = linear(dim, classes)

        def forward(self, x):
            h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
            for block in self.blocks:
                h = block(h)
            return self.head(self.norm(h).mean(1))

    return ViT()


def build_model(model: str, device, tiny: bool = False, seed: int = 0, attention: str = "sdpa-math"):
    """``(net, x, y, info)``: the torch_blue network on ``device``, the synthetic
    batch and a dict of facts for the JSON (batch, parameter counts, notes).
    ``attention`` (ViT only): see ``_blue_vit``."""
    _, vi = _import_blue()
    models = _bench_models()
    torch.manual_seed(seed)
    notes = [
        "torch_blue MeanFieldNormal variational distribution (its default initialisation) on every "
        "Linear/Conv2d weight and bias; priors MeanFieldNormal(0, 1/sqrt(fan_in)) on weights, (0, 1) on biases",
        "N particles = model(x, samples=N): torch_blue's torch.vmap over weight samples",
    ]
    if model == "mlp":
        sizes, batch = (TINY_MLP_SIZES, TINY_MLP_BATCH) if tiny else (models.MLP_SIZES, models.MLP_BATCH)
        net = _blue_mlp(vi, sizes)
        x, y = models.synthetic_data((sizes[0],), sizes[-1], batch, device)
        shape = {"sizes": list(sizes)}
        deterministic = 0
        notes.append("all parameters Bayesian (VILinear in a VISequential)")
    elif model == "vit":
        kw = dict(TINY_VIT) if tiny else {}
        batch = TINY_VIT_BATCH if tiny else models.VIT_BATCH
        net = _blue_vit(vi, **kw, attention=attention)
        image = kw.get("image", 32)
        x, y = models.synthetic_data((3, image, image), 10, batch, device)
        shape = {"image": image, **{k: v for k, v in kw.items() if k != "image"}}
        deterministic = net.pos.numel() + sum(
            p.numel() for m in net.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()
        )
        notes += [
            "patch embedding VIConv2d; fc1, fc2, head VILinear; blocks are VIModules; attention: "
            + {
                "sdpa-math": "VILinear qkv and proj around F.scaled_dot_product_attention forced to the MATH "
                "backend (under torch.vmap the CUDA memory-efficient kernel's backward fails in torch 2.11, "
                "'LSE is not correctly aligned (strideH)', and flash needs fp16/bf16); torch_blue's own "
                "VIMultiheadAttention also computes explicit softmax attention",
                "sdpa": "VILinear qkv and proj around F.scaled_dot_product_attention, PyTorch's backend choice",
                "mha": "torch_blue's VIMultiheadAttention (in_proj 3*dim x dim + out_proj, need_weights=True "
                "explicit attention; rescale_prior=True: priors N(0, 1/fan_in) on all its weights and biases)",
            }[attention],
            f"deterministic (torch_blue has no Bayesian LayerNorm or embedding): the {2 * len(net.blocks) + 1} "
            f"LayerNorms and the positional embedding, {deterministic} parameters (Bayesian in pyro_sp's ViT)",
        ]
    else:
        raise ValueError(f"unknown model {model!r}: mlp or vit")
    net = net.to(device)
    n_params = sum(p.numel() for p in net.parameters())
    info = {
        "batch": batch,
        "shape": shape,
        "trainable_parameters": n_params,
        "deterministic_parameters": deterministic,
        "notes": notes,
    }
    return net, x, y, info


def _make_loss(vi, kind: str, net, dataset_size: int):
    if kind == "kl":
        return vi.KullbackLeiblerLoss(vi.distributions.Categorical(), dataset_size=dataset_size)
    if kind == "analytical":  # sets net.return_log_probs = False: VILinear's local-reparameterization path
        return vi.AnalyticalKullbackLeiblerLoss(net, vi.distributions.Categorical(), dataset_size=dataset_size)
    raise ValueError(f"unknown loss {kind!r}: kl or analytical")


LOSS_NOTES = {
    "kl": "loss: KullbackLeiblerLoss(Categorical(), dataset_size=batch): sampled log q - log p of the drawn "
    "weights + data term -batch * mean over the batch of log(mean over samples of softmax(logits))",
    "analytical": "loss: AnalyticalKullbackLeiblerLoss(model, Categorical(), dataset_size=batch): closed-form "
    "Normal-Normal KL; it sets return_log_probs=False, so VILinear samples pre-activations (local "
    "reparameterization) instead of weights; VIConv2d still samples weights",
}


# --------------------------------------------------------------------------- timing


def _set_precision(device: torch.device, tf32: bool) -> None:
    if device.type != "cuda":
        return
    mode = "tf32" if tf32 else "ieee"
    try:  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    except AttributeError:  # pragma: no cover - older torch
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def _timed_steps(net, loss_fn, x, y, samples: int, warmup: int, steps: int, device: torch.device):
    """Per-step seconds of the timed steps, the peak GiB (CUDA, else None) and
    the warnings of the first step (e.g. vmap falling back to a loop)."""
    opt = torch.optim.Adam(net.parameters(), lr=LR)

    def step():
        opt.zero_grad()
        loss = loss_fn(net(x, samples=samples), y)
        loss.backward()
        opt.step()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    first_warnings = sorted({str(w.message).split(" (Triggered")[0] for w in caught})
    _bench_models()  # pyro_sp importable, also from a source checkout
    from pyro_sp.bench.timing import step_times

    times, peak = step_times(step, warmup=max(warmup - 1, 0), steps=steps, device=device)
    return times, peak, first_warnings


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _versions() -> dict:
    torch_blue, _ = _import_blue()
    return {"torch": torch.__version__, "torch_blue": torch_blue.__version__}


def _steps(tiny: bool, warmup, steps):
    return (TINY_WARMUP if warmup is None and tiny else 3 if warmup is None else warmup,
            TINY_STEPS if steps is None and tiny else 10 if steps is None else steps)


def run_single(
    model: str, particles: list[int], device: str, tiny: bool, warmup: int | None = None,
    steps: int | None = None, tf32: bool = False, loss: str = "kl", seed: int = 0,
    attention: str = "sdpa-math",
) -> dict:
    """One process: for each N in ``particles``, the median step time (ms) and,
    on CUDA, the peak memory (GiB) of torch_blue on ``model`` ("mlp" or "vit").
    ``warmup``/``steps`` default to 3/10 (1/2 with ``tiny``); ``loss`` "kl" or
    "analytical"; ``attention`` (ViT) "sdpa-math", "sdpa" or "mha"."""
    _, vi = _import_blue()
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    warmup, steps = _steps(tiny, warmup, steps)
    _set_precision(dev, tf32)
    rows, info, step_warnings = [], None, set()
    for n in particles:
        net = None
        try:
            net, x, y, info = build_model(model, dev, tiny, seed, attention)
            loss_fn = _make_loss(vi, loss, net, dataset_size=info["batch"])
            torch.manual_seed(seed + 1)  # the sampling noise
            times, peak, warns = _timed_steps(net, loss_fn, x, y, n, warmup, steps, dev)
            step_warnings.update(warns)
            result = {"step_ms_median": 1e3 * statistics.median(times)}
            if peak is not None:
                result["peak_gib"] = peak
        except torch.OutOfMemoryError:
            result = "out of memory"
        del net
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        row = {"particles": n, "torch_blue": result}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if info is None:  # every N ran out of memory before the model was built
        info = {"notes": []}
    return _result("single", model, dev, tiny, warmup, steps, tf32, loss, info, step_warnings, rows,
                   **({"attention": attention} if model == "vit" else {}))


def _result(suite, model, dev, tiny, warmup, steps, tf32, loss, info, step_warnings, rows, **extra) -> dict:
    notes = list(info.pop("notes")) + [LOSS_NOTES[loss]]
    notes += [f"warning on the first step: {w}" for w in sorted(step_warnings)]
    return {
        "suite": suite,
        "model": model,
        "device": _device_name(dev),
        "tiny": tiny,
        "loss": loss,
        "tf32": tf32 if dev.type == "cuda" else None,
        "warmup": warmup,
        "steps": steps,
        "optimizer": f"Adam(lr={LR})",
        **extra,
        **info,
        "versions": _versions(),
        "notes": notes,
        "rows": rows,
    }


def run_paper(
    model: str, per_gpu: list[int], device: str, tiny: bool, warmup: int | None = None,
    steps: int | None = None, tf32: bool = False, loss: str = "kl", seed: int = 0,
    attention: str = "sdpa-math",
) -> dict:
    """The paper's sampling parallelism (run under torchrun): DDP over ranks,
    the full batch and N = each of ``per_gpu`` particles on every rank, a
    different sampling seed per rank. Returns the result on rank 0, {} elsewhere."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    _, vi = _import_blue()
    dev = torch.device(device)
    created = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        created = True
    rank, world = dist.get_rank(), dist.get_world_size()
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    warmup, steps = _steps(tiny, warmup, steps)
    _set_precision(dev, tf32)
    rows, info, step_warnings = [], None, set()
    try:
        for n in per_gpu:
            # the same initialisation on every rank (DDP broadcasts rank 0's anyway)
            net, x, y, info = build_model(model, dev, tiny, seed, attention)
            loss_fn = _make_loss(vi, loss, net, dataset_size=info["batch"])
            ddp = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
            torch.manual_seed(seed + 1 + rank)  # each rank its own weight samples
            times, peak, warns = _timed_steps(ddp, loss_fn, x, y, n, warmup, steps, dev)
            step_warnings.update(warns)
            stats = torch.tensor(times + [peak or 0.0], dtype=torch.float64, device=dev)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank per step; the largest peak
            result = {"step_ms_median": 1e3 * statistics.median(stats[:-1].tolist())}
            if peak is not None:
                result["peak_gib"] = stats[-1].item()
            row = {"particles": n, "particles_per_gpu": n, "particles_total": n * world, "torch_blue": result}
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
            del ddp, net
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if created:
            import gc

            gc.collect()  # DDP reducers still referenced hold the group: free them first
            dist.destroy_process_group()
    if rank != 0:
        return {}
    info["notes"].append(
        "DistributedDataParallel (gradients averaged over ranks), full batch and N particles on every rank, "
        f"sampling seed {seed + 1} + rank; step time = the slowest rank's, peak = the largest rank's"
    )
    return _result("paper", model, dev, tiny, warmup, steps, tf32, loss, info, step_warnings, rows,
                   world_size=world, backend="nccl" if dev.type == "cuda" else "gloo", scaling="weak",
                   **({"attention": attention} if model == "vit" else {}))


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=("single", "paper"))
    p.add_argument("--model", choices=("mlp", "vit"), default="mlp")
    p.add_argument("--particles", type=int, nargs="+", default=[8, 32, 64], help="single: N per step")
    p.add_argument("--per-gpu", type=int, nargs="+", default=[8, 32], help="paper: N per rank")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (1 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="default 10 (2 with --tiny)")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls and convolutions (default: fp32)")
    p.add_argument("--loss", choices=("kl", "analytical"), default="kl",
                   help="KullbackLeiblerLoss (default) or AnalyticalKullbackLeiblerLoss")
    p.add_argument("--attention", choices=ATTENTION, default="sdpa-math",
                   help="ViT attention: SDPA on its MATH backend (default), SDPA's own backend choice, "
                   "or torch_blue's VIMultiheadAttention")
    p.add_argument("--tiny", action="store_true", help="tiny networks and steps, for CPU checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON here (rank 0)")
    args = p.parse_args(argv)
    common = dict(model=args.model, device=args.device, tiny=args.tiny, warmup=args.warmup, steps=args.steps,
                  tf32=args.tf32, loss=args.loss, seed=args.seed, attention=args.attention)
    if args.suite == "single":
        result = run_single(particles=args.particles, **common)
    else:
        result = run_paper(per_gpu=args.per_gpu, **common)
    if result and args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
