# Can the compute-bound products of one half of the samples overlap the memory-bound own-slot reads of
# the other half on one GPU? cuBLAS products (256 rows, Llama-2-7B's layer shapes, 32 layers) on one
# stream, memory-bound reads (512 MB a layer, as the own slots) on a second; each alone, then both at
# once, as CUDA graphs (median), twice.
#
#   python scripts/probe_overlap.py      # H100 output: bench/results/h100-80gb-hbm3/overlap-gemm-reads.txt
#   python scripts/probe_overlap.py --carveout 0 16 32 48 --blas cublas cublaslt
# --carveout: the products also with this many SMs left to other kernels (PyTorch's experimental
# torch._C._set_sm_carveout_experimental, which cuBLAS(Lt) takes as its SM count target); --blas: which
# library PyTorch calls for them
import argparse
import itertools
import sys

import torch

if not torch.cuda.is_available():  # before Triton, which CPU-only installs lack
    sys.exit("error: needs a CUDA GPU")
import triton.testing

LAYERS = 32
SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]  # wqkv, wo, w13, w2: (N, K)


def main(carveouts: list, blas: list):
    torch.manual_seed(0)
    weights = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in SHAPES] for _ in range(4)]
    x = {k: torch.randn(256, k, device="cuda", dtype=torch.bfloat16) for k in (4096, 11008)}  # (256, K)
    own = [torch.randn(256 << 20, device="cuda", dtype=torch.bfloat16) for _ in range(8)]  # 512 MB each
    out = torch.empty(8, device="cuda", dtype=torch.float32)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def gemms():
        for layer in range(LAYERS):
            for w in weights[layer % 4]:
                torch.mm(x[w.shape[1]], w.t())

    def reads():
        for layer in range(LAYERS):
            torch.sum(own[layer % 8], dim=0, out=out[layer % 8])

    def both():  # the two on their own streams, forked from and joined to the current one
        cur = torch.cuda.current_stream()
        s1.wait_stream(cur)
        s2.wait_stream(cur)
        with torch.cuda.stream(s1):
            gemms()
        with torch.cuda.stream(s2):
            reads()
        cur.wait_stream(s1)
        cur.wait_stream(s2)

    for library, carveout in itertools.product(blas, carveouts):
        if library is not None:
            torch.backends.cuda.preferred_blas_library(library)
        if carveout is not None:
            torch._C._set_sm_carveout_experimental(carveout)
        label = "" if library is None and carveout is None else f"[{library or 'default'}, carveout {carveout}] "
        ms = {}
        for name, fn in [("gemms", gemms), ("reads", reads), ("both", both)] * 2:
            ms[name] = triton.testing.do_bench_cudagraph(fn, return_mode="median")
            print(f"{label}{name} {ms[name]:.2f} ms", flush=True)
        if label:
            saved = ms["gemms"] + ms["reads"] - ms["both"]
            print(f"{label}overlap {saved:.2f} ms of {ms['gemms'] + ms['reads']:.2f}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--carveout", type=int, nargs="+", default=[None], help="SMs the products leave free")
    p.add_argument("--blas", nargs="+", default=[None], choices=["cublas", "cublaslt"])
    args = p.parse_args()
    main(args.carveout, args.blas)
