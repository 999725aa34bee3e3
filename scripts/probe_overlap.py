# Can the compute-bound products of one half of the samples overlap the memory-bound own-slot reads of
# the other half on one H100? cuBLAS GEMMs (256 rows, the 7B layer shapes) on one stream, a
# memory-bound read (own slots: 512 MB per layer) on a second, alone and together, in CUDA graphs.
# python scripts/probe_overlap.py  (output: bench/results/h100-80gb-hbm3/overlap-gemm-reads.txt)
import torch, triton.testing
torch.manual_seed(0)
L = 32
shapes = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
W = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in shapes] for _ in range(4)]
x = {k: torch.randn(256, k, device="cuda", dtype=torch.bfloat16) for k in (4096, 11008)}
own = [torch.randn(256 << 20, device="cuda", dtype=torch.bfloat16) for _ in range(8)]  # 512 MB each
out = torch.empty(8, device="cuda", dtype=torch.float32)
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
def gemms():
    for l in range(L):
        for w in W[l % 4]:
            torch.mm(x[w.shape[1]], w.t())
def reads():
    for l in range(L):
        torch.sum(own[l % 8], dim=0, out=out[l % 8])
def both():
    cur = torch.cuda.current_stream()
    s1.wait_stream(cur); s2.wait_stream(cur)
    with torch.cuda.stream(s1):
        gemms()
    with torch.cuda.stream(s2):
        reads()
    cur.wait_stream(s1); cur.wait_stream(s2)
for name, fn in (("gemms", gemms), ("reads", reads), ("both", both), ("gemms", gemms), ("reads", reads), ("both", both)):
    print(name, f"{triton.testing.do_bench_cudagraph(fn, return_mode='median'):.2f} ms", flush=True)
