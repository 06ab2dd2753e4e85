# Record of the command behind sass_round9_fused_weight_grad.json (CPU, Triton 3.5): the three forms' kernel files
# were round 9's .whl/kmaj, a worktree of 3df5ced with h100_round9_fused_weight_grad_inplace.patch applied (/tmp/direct),
# and .whl/early; kernel_sass.py as in that patch (TILES with BM). Kept as run.
import sys, re, os, json, subprocess, tempfile, collections
sys.path.insert(0, '/tmp/direct/benchmarks'); sys.path.insert(0, '/work/main')
import kernel_sass as ks, triton
ks.POINTERS.update({'gyt': '*fp32', 'xt': '*fp32'})
assert 'BM' in ks.TILES['weight_grad_kernel']
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
forms = {"kmajor": "/work/main/.whl/kmaj/pyro_sp/nn/_noise_kernels.py",
         "inplace": "/tmp/direct/pyro_sp/nn/_noise_kernels.py",
         "inplace_early_noise": "/work/main/.whl/early/pyro_sp/nn/_noise_kernels.py"}
tiles = [(64, 64, 32, 4, 3), (64, 64, 32, 8, 3), (64, 64, 64, 4, 2), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3),
         (128, 128, 32, 8, 3), (64, 32, 32, 4, 3), (16, 128, 64, 4, 3)]
out = {"what": "round 9's one-kernel weight gradients compiled for sm_90 (Triton %s on the CPU; the GPU ran 3.6), "
               "EVEN, TF32; registers and spill stack from cuobjdump -res-usage, tensor-core instructions counted in SASS "
               "(HGMMA: Hopper's warpgroup products; HMMA: the older warp-level ones)" % triton.__version__,
       "kernels": []}
for form, path in forms.items():
    m = ks._module(path)
    for t in tiles:
        c, _ = ks.compile_kernel(m, "weight_grad_kernel", list(t[:3]), t[3], t[4], "tf32", {"EVEN": True})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(c.asm["cubin"])
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        txt = ks.sass(c)
        ops = collections.Counter(re.findall(r"\b(HGMMA|HMMA|LDL|STL)\.", txt))
        row = {"form": form, "tile": dict(zip(("BO", "BK", "BM"), t[:3])), "warps": t[3], "stages": t[4],
               "registers": int(re.search(r"REG:(\d+)", res).group(1)), "spill_stack_bytes": int(re.search(r"STACK:(\d+)", res).group(1)),
               "shared_bytes": c.metadata.shared, **{k.lower(): v for k, v in ops.items()}}
        print(row, flush=True)
        out["kernels"].append(row)
json.dump(out, open("/work/main/benchmarks/results/regenerated/sass_round9_fused_weight_grad.json", "w"), indent=1)
