# Record of round 9's step timing script: synchronized per step against back to back (one sync per 40 steps). Kept as run.
# synchronized-per-step median vs back-to-back (one sync per 40 steps) mean, for one package
import sys, json, time, statistics, torch
import pyro_sp
from pyro_sp.bench.gpu import make_step, problem
out = sys.argv[1]; Ns = [int(a) for a in sys.argv[2].split(",")]
torch.set_float32_matmul_precision("high")
dev = torch.device("cuda")
net, x, y = problem("mlp", False, dev)
rows = []
for N in Ns:
    step = make_step("fused_regenerated_graphs", net, x, y, N, fused_adam=True)
    for _ in range(8): step()
    torch.cuda.synchronize()
    sync = []
    for _ in range(40):
        t = time.perf_counter(); step(); torch.cuda.synchronize(); sync.append(time.perf_counter() - t)
    b2b = []
    for _ in range(5):
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(40): step()
        torch.cuda.synchronize(); b2b.append((time.perf_counter() - t) / 40)
    host = []
    for _ in range(20):  # the host's own time per step (launch work), device allowed to queue
        t = time.perf_counter(); step(); host.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    r = {"package": pyro_sp.__file__, "N": N, "sync_ms_median": 1e3 * statistics.median(sync),
         "back_to_back_ms_median_of_5x40": 1e3 * statistics.median(b2b),
         "host_ms_per_step_median": 1e3 * statistics.median(host)}
    print(json.dumps(r), flush=True); rows.append(r)
    json.dump(rows, open(out, "w"), indent=1)
    import pyro; pyro.clear_param_store(); torch._dynamo.reset(); del step; torch.cuda.empty_cache()
