# Record of the command behind h100_round8_kernel_variants.json (round 8), run from the repository root:
#   python3 h100_round8_kernel_variants.py OUT.json base,even,A
# Each variant NAME is a copy of pyro_sp/nn/_noise_kernels.py at .whl/nk_NAME.py: base = round 7's
# kernels (0d15b65), even = this round's (no masks where the tiles divide), A = round 7's with the next
# tile's noise drawn before this tile's product (not kept). Kept as run, for the record.
import sys, os, json, importlib.util, torch
sys.path.insert(0, os.getcwd())

from benchmarks.regenerated_check import median_ms
from pyro_sp.nn import regenerated_noise as rn

def forward_launch(mod, tile, x, loc, scale, seeds, y, shared, precision):
    bm, bo, bk, warps, stages = tile
    (o, k), n, m = loc.shape, seeds.shape[0], x.shape[-2]
    grid = (n * rn._cdiv(m, bm) * rn._cdiv(o, bo),)
    ev = {"EVEN": True} if "EVEN" in mod.forward_kernel.arg_names else {}
    return lambda: mod.forward_kernel[grid](
        x, loc, scale, seeds, y, n, m, o, k, rn._cdiv(k, 4), 0 if shared else x.stride(0), x.stride(-2), x.stride(-1),
        *y.stride(), BM=bm, BO=bo, BK=bk, ROUNDS=rn.ROUNDS, PRECISION=precision, ACC=rn._accumulator(x.dtype),
        num_warps=warps, num_stages=stages, **ev)

def grad_input_launch(mod, tile, gy, loc, scale, seeds, gx, precision):
    bm, bk, bo, warps, stages = tile
    (o, k), n, m = loc.shape, seeds.shape[0], gy.shape[-2]
    grid = (n * rn._cdiv(m, bm) * rn._cdiv(k, bk),)
    ev = {"EVEN": True} if "EVEN" in mod.grad_input_kernel.arg_names else {}
    return lambda: mod.grad_input_kernel[grid](
        gy, loc, scale, seeds, gx, n, m, o, k, rn._cdiv(k, 4), *gy.stride(), *gx.stride(), SUM_PARTICLES=False,
        BM=bm, BK=bk, BO=bo, ROUNDS=rn.ROUNDS, PRECISION=precision, ACC=rn._accumulator(gy.dtype),
        num_warps=warps, num_stages=stages, **ev)

out = sys.argv[1]
variants = sys.argv[2].split(",")
profile = len(sys.argv) > 3
def load(name):
    spec = importlib.util.spec_from_file_location("nk_" + name, f".whl/nk_{name}.py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m
dev = torch.device("cuda"); N, M = 32, 256
FWD = [(256, 64, 16, 8, 3), (256, 64, 16, 4, 3), (256, 128, 16, 8, 3)]
GI = [(256, 64, 16, 8, 3), (256, 64, 16, 4, 3)]
res = []
torch.manual_seed(0)
for K, O, shared in [(3072, 2048, True), (2048, 2048, False)]:
    loc = torch.randn(O, K, device=dev) * 0.05; scale = torch.rand(O, K, device=dev) * 0.05
    seeds = rn.draw_seeds(N, dev)
    x = torch.randn((M, K) if shared else (N, M, K), device=dev)
    gy = torch.randn(N, M, O, device=dev)
    for v in variants:
        mod = load(v)
        # check: fp32 forward against bmm of the variant's own noise
        eps = torch.empty(N, O, K, device=dev)
        mod.noise_kernel[(rn._cdiv(O, 32) * rn._cdiv(K, 64), N)](seeds, eps, O, K, rn._cdiv(K, 4), BO=32, BK=64, ROUNDS=10)
        w = loc + scale * eps
        ref = torch.matmul(x, w.transpose(1, 2)) if True else None
        y = torch.empty(N, M, O, device=dev)
        forward_launch(mod, (256, 64, 16, 8, 3), x, loc, scale, seeds, y, shared, "ieee")()
        err = float((y - ref).abs().max() / ref.abs().max())
        row = {"K": K, "O": O, "variant": v, "fwd_rel_err_fp32": err}
        if not shared:
            gx = torch.empty(N, M, K, device=dev)
            grad_input_launch(mod, (256, 64, 16, 8, 3), gy, loc, scale, seeds, gx, "ieee")()
            gref = torch.bmm(gy, w)
            row["gi_rel_err_fp32"] = float((gx - gref).abs().max() / gref.abs().max())
        del eps, w, ref
        for t in FWD:
            y = torch.empty(N, M, O, device=dev)
            f = forward_launch(mod, t, x, loc, scale, seeds, y, shared, "tf32")
            try:
                row[f"fwd{t}"] = median_ms(f)
            except Exception as e:
                row[f"fwd{t}"] = str(e)[:80]
            if profile and t[3] == (8 if v == "base" else 4) and K == 3072:
                torch.cuda.synchronize(); torch.cuda.profiler.start(); f(); torch.cuda.synchronize(); torch.cuda.profiler.stop()
        if not shared:
            gx = torch.empty(N, M, K, device=dev)
            for t in GI:
                try:
                    row[f"gi{t}"] = median_ms(grad_input_launch(mod, t, gy, loc, scale, seeds, gx, "tf32"))
                except Exception as e:
                    row[f"gi{t}"] = str(e)[:80]
        print(json.dumps(row), flush=True)
        res.append(row)
        json.dump(res, open(out, "w"), indent=1)
