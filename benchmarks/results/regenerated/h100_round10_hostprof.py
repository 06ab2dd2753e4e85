# host-side profile of MeanFieldVI's regenerated + graphs step (N=32), steps queued back to back
import sys, time, cProfile, pstats, statistics, io, torch
from pyro_sp.bench.gpu import make_step, problem
torch.set_float32_matmul_precision("high")
dev = torch.device("cuda")
net, x, y = problem("mlp", False, dev)
step = make_step("fused_regenerated_graphs", net, x, y, 32, fused_adam=True)
for _ in range(10): step()
torch.cuda.synchronize()
# host time to the first kernel of a step after an idle device: time to the first event
lat = []
for _ in range(20):
    torch.cuda.synchronize()
    t = time.perf_counter(); step(); h = time.perf_counter() - t; torch.cuda.synchronize(); lat.append(h)
print("host ms per step after a sync (device idle at start):", 1e3 * statistics.median(lat))
pr = cProfile.Profile(); pr.enable()
for _ in range(40): step()
pr.disable(); torch.cuda.synchronize()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45); print(s.getvalue()[:9000])
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25); print(s.getvalue()[:6000])
