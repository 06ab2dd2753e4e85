# Record of round 9's per-layer timing script (run from $OUT with PYTHONPATH set to one package; see h100_round9_call1.sh, _call2.sh). Kept as run.
# per-layer backward of noise_linear (N particles, TF32): time, peak, autotuner timings, error vs float64
import sys, json, statistics, torch
import pyro_sp
from pyro_sp.nn import regenerated_noise as rn
out, N = sys.argv[1], int(sys.argv[2])
dev = torch.device("cuda"); M = 256
def med(f, reps=20):
    f(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)
rows = []
torch.manual_seed(0)
for K, O, shared in [(3072, 2048, True), (2048, 2048, False), (2048, 10, False)]:
    loc = torch.randn(O, K, device=dev) * 0.05; scale = torch.rand(O, K, device=dev) * 0.05
    seeds = rn.draw_seeds(N, dev)
    x = torch.randn((M, K) if shared else (N, M, K), device=dev)
    gy = torch.randn(N, M, O, device=dev)
    f = lambda: rn.noise_linear_backward(gy, x, loc, scale, seeds, shared, "tf32", not shared)
    f(); torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    r = f(); torch.cuda.synchronize(); peak = (torch.cuda.max_memory_allocated() - base) / 2**30; del r
    row = {"package": pyro_sp.__file__, "N": N, "K": K, "O": O, "shared": shared, "backward_ms": med(f),
           "backward_peak_extra_gib": round(peak, 3)}
    k = rn.kernels(dev)
    for kind in ("weight_grad", "grad_input"):
        at = getattr(k, kind)
        row[f"{kind}_best"] = str(getattr(at, "best_config", None))
        ct = getattr(at, "configs_timings", None) or {}
        row[f"{kind}_timings"] = {str(c): (t[0] if isinstance(t, (list, tuple)) else t) for c, t in ct.items()}
    # error against float64 with the same noise
    if O * K * N * 8 < 2**31:
        _, gl, gs = f()
        eps = rn.weight_noise(seeds, (O, K)).double()
        xd = x.double(); gyd = gy.double()
        p = torch.einsum("nmo,mk->nok", gyd, xd) if shared else torch.einsum("nmo,nmk->nok", gyd, xd)
        for name, a, b in (("loc", gl, p.sum(0)), ("scale", gs, (p * eps).sum(0))):
            row[f"rel_err_{name}"] = float((a.double() - b).norm() / b.norm())
        del eps, p
    print(json.dumps({k2: v for k2, v in row.items() if "timings" not in k2}), flush=True)
    rows.append(row)
    json.dump(rows, open(out, "w"), indent=1)
