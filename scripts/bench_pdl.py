# An experiment: does programmatic dependent launch (PDL, Hopper's griddepcontrol) shorten a decode
# step's chain of weight-streaming kernels in a CUDA graph? A bare copy of the bf16 path of
# linear_triton's kernel streams Llama-2-7B's 32 layers of wqkv and w13 (and, with narrow=cublas, wo and
# w2 through cuBLAS between them), launched
#   MODE 0: plainly;  MODE 1: with PDL: each program waits for the previous kernel (gdc_wait) before
#   its loads and lets the next one launch after its K loop;  MODE 2: as 1, after prefetching its first
#   PREF weight blocks into L2 before the wait.
# Result on an H100 (bench/results/h100-80gb-hbm3/pdl.md): at most 1% faster; not used.
#
#   python scripts/bench_pdl.py
import sys

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before Triton, which CPU-only installs lack
    sys.exit("error: needs a CUDA GPU")
import triton
import triton.language as tl
import triton.testing
print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
import torch._inductor.config as ic
print("inductor enable_pdl:", hasattr(ic.triton, "enable_pdl"))

@triton.jit
def _prefetch(ptrs):
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)

@triton.jit
def lin(X, W, Out, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        MODE: tl.constexpr, PREF: tl.constexpr):
    nb = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    rmask = rows < M
    kk = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * K + kk[None, :]
    w_ptrs = W + cols[:, None].to(tl.int64) * K + kk[None, :]
    if MODE == 2:  # L2 prefetch of the first PREF blocks, then wait
        lines = W + cols[:, None].to(tl.int64) * K + tl.arange(0, PREF * BLOCK_K // 64)[None, :] * 64
        _prefetch(lines)
    if MODE >= 1:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=rmask[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=cmask[:, None], other=0.0, eviction_policy="evict_first")
        acc = tl.dot(w, tl.trans(x), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if MODE >= 1:
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.trans(acc)
    tl.store(Out + rows[:, None] * N + cols[None, :], acc.to(Out.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])

def run(x, w, out, mode, pref=4):
    M, K = x.shape; N = w.shape[0]
    lin[(triton.cdiv(N, 64),)](x, w, out, M, N, K, BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=64, BLOCK_K=128,
                               MODE=mode, PREF=pref, num_warps=4, num_stages=5, launch_pdl=mode >= 1)

L = 32
Ws = [(torch.randn(12288, 4096, device="cuda", dtype=torch.bfloat16) * .02,
       torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * .02,
       torch.randn(22016, 4096, device="cuda", dtype=torch.bfloat16) * .02,
       torch.randn(4096, 11008, device="cuda", dtype=torch.bfloat16) * .02) for _ in range(L)]
nbytes = sum(sum(t.numel() * 2 for t in ws) for ws in Ws)
wide_bytes = sum(ws[0].numel() * 2 + ws[2].numel() * 2 for ws in Ws)
xbig = torch.randn(1 << 31, device="cuda", dtype=torch.bfloat16)
ms = triton.testing.do_bench_cudagraph(xbig.sum, return_mode="min"); bw = xbig.numel() * 2 / ms / 1e-3; del xbig
print(f"read bw {bw/1e9:.0f} GB/s; weights {nbytes/1e9:.2f} GB, {nbytes/bw*1e3:.3f} ms at that rate")

def chain(M, mode, narrow, pref=4):
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    o1 = torch.empty(M, 12288, device="cuda", dtype=torch.bfloat16)
    o3 = torch.empty(M, 22016, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(M, 11008, device="cuda", dtype=torch.bfloat16)
    def step():
        h = x
        for wqkv, wo, w13, w2 in Ws:
            run(h, wqkv, o1, mode, pref)
            if narrow == "cublas":
                h = F.linear(o1[:, :4096], wo)
            run(h, w13, o3, mode, pref)
            if narrow == "cublas":
                h = F.linear(a, w2)
        return h
    # correctness of one launch
    ref = F.linear(x, Ws[0][0]); run(x, Ws[0][0], o1, mode, pref); torch.cuda.synchronize()
    err = ((o1.float() - ref.float()).norm() / ref.float().norm()).item()
    t = triton.testing.do_bench_cudagraph(step, rep=200, return_mode="median")
    nbytes = globals()["nbytes"] if narrow == "cublas" else wide_bytes
    print(f"M={M} mode={mode} pref={pref} narrow={narrow}: {t:.3f} ms ({nbytes/t/1e6:.0f} GB/s, {100*nbytes/bw/t*1e3:.1f}% of read) err {err:.2e}", flush=True)

for M in (1, 32):
    for narrow in ("cublas", "none"):
        for mode, pref in ((0, 4), (1, 4), (2, 2), (2, 4), (2, 8)):
            chain(M, mode, narrow, pref)
