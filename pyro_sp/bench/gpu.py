# SPDX-License-Identifier: Apache-2.0
"""Step time and peak memory of Bayesian networks on one device (``single``),
under torchrun with one process per GPU (``scaling``), and the largest number
of particles that fits (``memory``). Not a test: writes JSON.

Networks (:mod:`pyro_sp.bench.models`): ``mlp`` (3072-2048-2048-10, batch
256) and ``vit`` (ViT-small for CIFAR-10 shapes, batch 128), every parameter
Bayesian with a mean-field Normal guide, synthetic data.

Variants, all the same estimator (``Trace_ELBO``: one-sample KL, vectorized particles):

``pyro``            Pyro's ``Trace_ELBO`` + ``AutoNormal`` on the model
                    ``categorical_likelihood(BayesianModule(net)(x), y)``;
``pyro_sp``         ``DistributedTrace_ELBO`` on the same model and guide;
``fused_eager``     :class:`pyro_sp.nn.MeanFieldVI` (``kl="sample"``) without compilation;
``fused``           the same, ``torch.compile``\\ d;
``fused_analytic``  compiled, closed-form KL (``kl="analytic"``: a lower-variance estimator);
``fused_split``     ``fused`` with ``split_compiled_graph=True`` (graph split at the gradient buckets);
``fused_bf16``      ``fused_analytic`` with ``precision="bf16"``;
``fused_regenerated``, ``fused_regenerated_bf16``, ``fused_regenerated_eager``
                    ``fused_analytic`` (``fused_bf16``; ``fused_analytic`` not compiled) with
                    ``weight_noise="regenerated"``: the same estimator, the Linear layers' weight noise
                    drawn inside Triton kernels (:mod:`pyro_sp.nn.regenerated_noise`); not run unless
                    named in ``--variants``;
``fused_analytic_graphs``, ``fused_regenerated_graphs``, ``fused_regenerated_bf16_graphs``
                    ``fused_analytic``, ``fused_regenerated`` and ``fused_regenerated_bf16`` with
                    ``cuda_graphs=True`` (each step, Adam's update included, replayed as one CUDA graph;
                    CUDA only); not run unless named in ``--variants``;
``fused_local_reparam``, ``fused_flipout``
                    ``fused_analytic`` with ``estimator="local_reparam"`` / ``"flipout"``: lower-variance
                    estimators of the same gradient (:mod:`pyro_sp.nn.layer_estimators`), not
                    run unless named in ``--variants``;
``pyro_primitives``, ``pyro_sp_primitives``
                    ``pyro`` and ``pyro_sp`` on the MLP written with one ``pyro.sample`` per
                    weight and bias (:func:`pyro_sp.bench.cpu.bnn_model`, N(0, 1) priors,
                    weights scaled by ``1/sqrt(fan_in)`` in the forward) instead of a
                    ``BayesianModule``; ``mlp`` only, not run unless named in ``--variants``.

Times come from :mod:`pyro_sp.bench.timing` (CUDA synchronised around each
step, peak memory over the timed steps). ``scaling`` adds, per row, every
collective of pyro_sp per step by kind, recorded over 3 more steps.

Examples::

    pyro-sp bench gpu-single --model mlp --particles 8 32 64 --out single.json
    pyro-sp bench gpu-scaling --nproc 2 --model vit --per-gpu 8 --particles 64
    pyro-sp bench gpu-memory --model mlp --variants fused pyro_sp
"""

from __future__ import annotations

import argparse
import gc
import json
import traceback

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import pyro_sp
from pyro_sp.bench import write_result
from pyro_sp.bench.cpu import bnn_model
from pyro_sp.bench.models import MLP_BATCH, MLP_SIZES, VIT_BATCH, ViTSmall, mlp, synthetic_data
from pyro_sp.bench.timing import collectives_per_step, timed
from pyro_sp.distributed.record import record_collectives
from pyro_sp.nn import BayesianModule, MeanFieldVI, categorical_likelihood

#: The variants ``single`` runs by default (all but the Pyro-primitive MLP).
DEFAULT_VARIANTS = ("pyro", "pyro_sp", "fused_eager", "fused", "fused_analytic", "fused_split")
#: pyro_sp's general path compiled (``compile=True``; ``cuda_graphs=True`` for ``_graphs``) with
#: Pyro's SVI and ``pyro.optim.Adam``; ``_grouped``: the same SVI with :func:`pyro_sp.optim.Adam`
#: (one ``torch.optim.Adam`` step for all parameters, as the fused variants have; CUDA graphs on
#: CUDA); ``_native``: the PyTorch-native loop (``elbo(model, guide)``, one ``torch.optim.Adam``;
#: CUDA graphs on CUDA).
COMPILED_VARIANTS = ("pyro_sp_compiled", "pyro_sp_compiled_graphs", "pyro_sp_compiled_grouped",
                     "pyro_sp_compiled_native")
#: MeanFieldVI with a layer estimator (compiled, closed-form KL).
LAYER_VARIANTS = ("fused_local_reparam", "fused_flipout")
#: MeanFieldVI with the Linear layers' weight noise drawn inside Triton kernels (closed-form KL).
REGENERATED_VARIANTS = ("fused_regenerated", "fused_regenerated_bf16", "fused_regenerated_eager")
#: ``fused_analytic`` and ``fused_regenerated`` replayed as CUDA graphs.
GRAPH_VARIANTS = ("fused_analytic_graphs", "fused_regenerated_graphs", "fused_regenerated_bf16_graphs")
VARIANTS = DEFAULT_VARIANTS + ("pyro_primitives", "pyro_sp_primitives") + COMPILED_VARIANTS + LAYER_VARIANTS + (
    "fused_bf16",) + REGENERATED_VARIANTS + GRAPH_VARIANTS
#: The variants that are a :class:`~pyro_sp.nn.MeanFieldVI` (:func:`mean_field`).
MEAN_FIELD_VARIANTS = tuple(v for v in VARIANTS if v.startswith("fused"))
#: Steps recorded after the timed ones (``scaling``) for the collectives per step.
RECORDED_STEPS = 3


def problem(model: str, tiny: bool, device, batch: int | None = None):
    """``(network, x, y)`` for ``model`` in ``("mlp", "vit")``."""
    torch.manual_seed(0)
    if model == "mlp":
        sizes = (64, 32, 32, 10) if tiny else MLP_SIZES
        net, shape, b = mlp(sizes), (sizes[0],), (16 if tiny else MLP_BATCH)
    elif model == "vit":
        net = ViTSmall(image=8, dim=16, depth=1, heads=2, hidden=32) if tiny else ViTSmall()
        shape, b = ((3, 8, 8) if tiny else (3, 32, 32)), (4 if tiny else VIT_BATCH)
    else:
        raise ValueError(f"Expected model 'mlp' or 'vit', got {model!r}.")
    x, y = synthetic_data(shape, 10, batch or b, device)
    return net.to(device), x, y


def _mlp_sizes(net) -> tuple[int, ...]:
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)] if isinstance(net, torch.nn.Sequential) else []
    if not linears:
        raise ValueError(
            f"Expected the MLP (--model mlp) for the variants pyro_primitives and pyro_sp_primitives, "
            f"got a {type(net).__name__}. Use --model mlp or other variants."
        )
    return (linears[0].in_features,) + tuple(m.out_features for m in linears)


def make_step(variant: str, net, x, y, num_particles: int, mesh=None, fused_adam: bool = False):
    """A function that runs one optimisation step of ``variant`` (``fused_adam``: the variants with a
    ``torch.optim.Adam`` take its one-kernel implementation, ``fused=True``, instead of the default)."""
    bnn = BayesianModule(net, prior_scale="fan_in")
    if variant in ("pyro", "pyro_sp", "pyro_primitives", "pyro_sp_primitives") + COMPILED_VARIANTS:
        pyro.clear_param_store()
        if variant.endswith("_primitives"):
            pyro.set_rng_seed(0)
            model = bnn_model(_mlp_sizes(net))
        else:
            def model(x, y):
                return categorical_likelihood(bnn(x), y)

        guide = AutoNormal(model, init_scale=0.01)
        if variant in ("pyro", "pyro_primitives"):
            loss = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
        else:
            graphs = variant.endswith("_graphs") or (variant.endswith(("_native", "_grouped")) and x.device.type == "cuda")
            compiled = {"compile": True, "cuda_graphs": graphs} if variant in COMPILED_VARIANTS else {}
            loss = pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=num_particles, mesh=mesh,
                                                 **compiled)
        if variant.endswith("_native"):
            return _native_step(loss(model, guide), x, y, fused_adam)
        adam = pyro_sp.optim.Adam if variant.endswith("_grouped") else pyro.optim.Adam
        svi = SVI(model, guide, adam({"lr": 1e-3}), loss=loss)
        return lambda: svi.step(x, y)
    if variant not in VARIANTS:
        raise ValueError(f"Expected a variant in {VARIANTS}, got {variant!r}.")
    vi, optim = mean_field(variant, bnn, num_particles, x.device, mesh, fused_adam)
    return lambda: vi.step(optim, x, y)


def mean_field(variant: str, bnn: BayesianModule, num_particles: int, device, mesh=None, fused_adam: bool = False):
    """``(vi, optimizer)``: the :class:`~pyro_sp.nn.MeanFieldVI` of a ``fused*`` ``variant`` on
    ``device`` and its ``torch.optim.Adam`` (capturable with graphs: the update is replayed in the
    step's graph)."""
    if variant not in MEAN_FIELD_VARIANTS:
        raise ValueError(f"Expected a MeanFieldVI variant in {MEAN_FIELD_VARIANTS}, got {variant!r}.")
    graphs = variant in GRAPH_VARIANTS
    base = variant.removesuffix("_graphs")
    estimator = base[len("fused_"):] if base in LAYER_VARIANTS else "exact"
    vi = MeanFieldVI(
        bnn, num_particles=num_particles, mesh=mesh, seed=0, init_scale=0.01, estimator=estimator,
        kl="analytic" if base in ("fused_analytic", "fused_bf16") + LAYER_VARIANTS + REGENERATED_VARIANTS
        else "sample",
        precision="bf16" if base.endswith("bf16") else "fp32",
        weight_noise="regenerated" if base in REGENERATED_VARIANTS else "stored",
        compile=not base.endswith("eager"), split_compiled_graph=base == "fused_split", cuda_graphs=graphs,
    ).to(device)
    # with graphs, the update is replayed in the step's graph (capturable: its step count on the device)
    optim = torch.optim.Adam([p for p in vi.parameters() if p.requires_grad], lr=1e-3, **_adam(fused_adam),
                             **({"capturable": True} if graphs else {}))
    return vi, optim


def _adam(fused: bool) -> dict:
    return {"fused": True} if fused else {}


def _native_step(elbo, x, y, fused_adam: bool = False):
    """The PyTorch-native loop of an ELBO module: the first call creates the parameters,
    then one ``torch.optim.Adam`` over all of them."""
    elbo(x, y)
    optim = torch.optim.Adam(list(elbo.parameters()), lr=1e-3, **_adam(fused_adam))

    def step():
        optim.zero_grad(set_to_none=True)
        loss = elbo(x, y)
        loss.backward()
        optim.step()
        return loss

    return step


def _attempt(variant, net, x, y, n, device, warmup, steps, mesh=None, record: bool = False,
             fused_adam: bool = False, back_to_back: int = 0) -> dict | str:
    """``{"step_ms_median", "peak_gib" (CUDA)}`` of ``variant`` (:func:`~pyro_sp.bench.timing.timed`),
    with ``"step_ms_back_to_back"`` for ``back_to_back`` rounds and ``"collectives_per_step"`` if
    ``record``; ``"out of memory"`` if it does not fit; ``"failed: <error>"`` if it raised in a single
    process."""
    try:
        step = make_step(variant, net, x, y, n, mesh, fused_adam)
        result = timed(step, warmup=warmup, steps=steps, device=device, back_to_back=back_to_back)
        if record:
            with record_collectives() as rec:
                for _ in range(RECORDED_STEPS):
                    step()
            result["collectives_per_step"] = collectives_per_step(rec, RECORDED_STEPS)
        return result
    except Exception as e:
        if mesh is not None and mesh.world_size > 1:
            raise  # the other ranks are inside the step's collectives: stop the whole job
        if isinstance(e, torch.OutOfMemoryError):
            return "out of memory"
        # one process: the failure is this variant's row (traceback on stderr), the others still run
        traceback.print_exc()
        return f"failed: {type(e).__name__}: {str(e)[:500]}"
    finally:
        pyro.clear_param_store()
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _device(name: str):
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def _about(args) -> dict:
    """What a result says of its run besides its rows: the device, TF32, fused Adam (``single``)."""
    about = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "tf32": args.tf32}
    if args.suite == "single":
        about["fused_adam"] = args.fused_adam
    return about


def single(args) -> dict:
    device = _device(args.device)
    net, x, y = problem(args.model, args.tiny, device)
    rows = []
    for n in args.particles:
        row = {"particles": n}
        for variant in args.variants:
            row[variant] = _attempt(variant, net, x, y, n, device, args.warmup, args.steps,
                                    fused_adam=args.fused_adam, back_to_back=args.back_to_back)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_result(args.out, {"suite": "gpu-single", "model": args.model, "rows": rows, **_about(args)},
                     partial=True)
    return {"suite": "gpu-single", "model": args.model, "rows": rows}


def memory(args) -> dict:
    """The largest N that fits (doubling, then bisection to ``--resolution``), per variant."""
    device = _device(args.device)
    net, x, y = problem(args.model, args.tiny, device)
    if device.type != "cuda":
        raise SystemExit("The memory suite needs a CUDA device (--device cuda).")
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    out = {"suite": "gpu-memory", "model": args.model, "device_memory_gib": total, "variants": {}}
    for variant in args.variants:
        probes, fits, fails = {}, 0, None
        n = args.start
        while fails is None and n <= args.max_particles:
            r = probes[n] = _attempt(variant, net, x, y, n, device, 1, 1)
            if r == "out of memory":
                fails = n
            else:
                fits, n = n, n * 2
        while fails is not None and fails - fits > max(1, int(args.resolution * fits)):
            n = (fits + fails) // 2
            r = probes[n] = _attempt(variant, net, x, y, n, device, 1, 1)
            fits, fails = (n, fails) if r != "out of memory" else (fits, n)
        out["variants"][variant] = {
            "largest_fitting": fits,
            "smallest_failing": fails,
            "probes": {str(k): v for k, v in sorted(probes.items())},
        }
        print(json.dumps({variant: out["variants"][variant]}), flush=True)
    return out


def scaling(args) -> dict:
    """Under torchrun: strong (``--particles``, global) and weak (``--per-gpu``) scaling."""
    sample = 1 if args.data_parallel else args.sample
    mesh = pyro_sp.init_mesh(sample=sample)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    net, x, y = problem(args.model, args.tiny, device)
    if mesh.data > 1:
        x, y = x.tensor_split(mesh.data)[mesh.data_index], y.tensor_split(mesh.data)[mesh.data_index]
    configs = [("strong", n) for n in args.particles] + [("weak", p * mesh.sample) for p in args.per_gpu]
    rows = []
    for kind, total in configs:
        for variant in args.variants:
            result = _attempt(variant, net, x, y, total, device, args.warmup, args.steps, mesh, record=True)
            row = {
                "variant": variant,
                "grid": f"{mesh.sample}x{mesh.data}",
                "gpus": mesh.world_size,
                "scaling": kind,
                "particles_total": total,
                "particles_per_gpu": total / mesh.sample,
                "batch_per_gpu": x.shape[0],
                "result": result,
            }
            rows.append(row)
            if mesh.rank == 0:
                print(json.dumps(row), flush=True)
    rank = mesh.rank  # read before the group is gone: afterwards every process reads 0
    if mesh.is_distributed:
        gc.collect()  # DDP reducers of the finished steps hold the group: free them first
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {"suite": "gpu-scaling", "model": args.model, "rows": rows} if rank == 0 else {}


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=("single", "scaling", "memory"))
    p.add_argument("--model", choices=("mlp", "vit"), default="mlp")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    p.add_argument("--particles", type=int, nargs="*", default=None, help="global N (single, strong scaling)")
    p.add_argument("--per-gpu", type=int, nargs="*", default=[], help="scaling: particles per GPU (weak)")
    p.add_argument("--sample", type=int, default=None, help="scaling: sample axis size (default: all ranks)")
    p.add_argument("--data-parallel", action="store_true", help="scaling: --sample 1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--start", type=int, default=8, help="memory: first N")
    p.add_argument("--max-particles", type=int, default=4096, help="memory: stop doubling here")
    p.add_argument("--resolution", type=float, default=0.1, help="memory: bisect to this relative gap")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls and convolutions (default: full fp32)")
    p.add_argument("--fused-adam", action="store_true",
                   help="single: torch.optim.Adam(fused=True) for the variants that use it (default: its default)")
    p.add_argument("--back-to-back", type=int, default=0, metavar="ROUNDS",
                   help="single: also time ROUNDS rounds of --steps steps synchronised once per round, as a "
                        "training loop that does not wait for each step runs (step_ms_back_to_back; the SVI "
                        "variants' steps return a float and wait for themselves anyway)")
    p.add_argument("--tiny", action="store_true", help="tiny networks and few steps (a smoke run)")
    p.add_argument("--out", default=None, help="JSON file (rank 0)")
    return p


def run(argv=None, prog: str | None = None) -> dict:
    p = parser(prog)
    args = p.parse_args(argv)
    if args.back_to_back < 0 or (args.back_to_back and args.suite != "single"):
        p.error(f"expected --back-to-back ROUNDS >= 1 with the suite 'single' only, got {args.back_to_back} "
                f"with {args.suite!r}")
    if args.variants is None:
        args.variants = ["fused", "pyro_sp"] if args.suite != "single" else list(DEFAULT_VARIANTS)
    if args.particles is None:
        args.particles = [8, 32, 64] if args.suite != "scaling" else []
    if args.tiny:
        args.warmup, args.steps = 1, 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    result = {"single": single, "scaling": scaling, "memory": memory}[args.suite](args)
    if result:
        result.update(_about(args))
        result["versions"] = {"torch": torch.__version__, "pyro": pyro.__version__, "pyro_sp": pyro_sp.__version__}
        if args.out:
            write_result(args.out, result)
    return result


if __name__ == "__main__":
    run()  # a rank under torchrun exits cleanly through pyro_sp.distributed.mesh's teardown
