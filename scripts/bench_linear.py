# One decode-step linear layer alone, on a GPU: cuBLAS (bf16), the Triton kernel of linear_triton.py
# with bf16, int8 (w8a16) and int4 (w4a16) weights (its default tiles, and others with --sweep), the
# plain int8 path (cast to bf16, cuBLAS, scale) and PyTorch's own int4 kernel, each against the weight
# bytes it must read over the read bandwidth measured in the same run. Each variant is checked against
# cuBLAS (bf16), the plain int8 path or the dequantized int4 weight before it is timed. Times are
# CUDA-graph replays (no launch overhead) rotating over enough weight copies (> 200 MB) that no weight
# is served from L2, as in a real step. For the MLP's fused gate and up layer (w13) the kernel is also
# timed with the activation in its epilogue (swiglu: silu(gate) * up written, half the columns).
#
#   python scripts/bench_linear.py                                   # Llama-2-7B's decode shapes
#   python scripts/bench_linear.py --shapes wo w2 --samples 1 32 --sweep --output linear.json
#   python scripts/bench_linear.py --samples 1 32 64 --weights bf16 int8 --tma    # pointer loads vs the TMA
#   python scripts/bench_linear.py --shapes wo w2 --samples 256 --weights bf16 --max_m 256 --sweep  # vs cuBLAS's addmm
import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `import linear_triton` as a script

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before Triton, which CPU-only installs lack
    sys.exit("error: needs a CUDA GPU")
import triton
import triton.testing

import linear_triton
import quantize
from bench_attention import read_bandwidth, write_results
from linear_triton import Tiles, default_tiles, row_tiles_on, run_linear
from model import swiglu

SHAPES = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w1": (11008, 4096), "w2": (4096, 11008), "w13": (22016, 4096),
          "output": (32000, 4096),
          "mistral-wqkv": (6144, 4096), "mistral-w13": (28672, 4096), "mistral-w2": (4096, 14336)}  # wo as Llama's
SWEEP = [Tiles(block_n=n, block_k=k, waves=w, stages=s, warps=nw)
         for n, k, w, s, nw in [(16, 256, 2, 4, 4), (16, 512, 2, 3, 4), (32, 256, 2, 4, 4), (32, 256, 2, 3, 4),
                                (32, 128, 4, 4, 4), (32, 128, 1, 6, 4), (32, 128, 2, 6, 4), (32, 512, 2, 3, 8),
                                (64, 128, 2, 4, 4), (64, 128, 1, 5, 4), (64, 256, 2, 3, 8), (64, 64, 2, 6, 4),
                                (128, 64, 2, 4, 4), (128, 128, 2, 3, 8), (16, 128, 2, 6, 2), (32, 128, 3, 4, 4),
                                (64, 128, 1, 3, 4), (64, 128, 1, 4, 4), (128, 64, 1, 4, 8)]]  # 32+ rows
# narrow layers (N = 4096) in one wave without splits of K: 128 or 256 programs, each streaming whole rows
SWEEP += [Tiles(block_n=n, block_k=k, splits=p, stages=s, warps=nw)
          for n, k, p, s, nw in [(32, 256, 1, 6, 4), (32, 128, 1, 8, 4), (32, 256, 1, 4, 8), (32, 512, 1, 3, 8),
                                 (16, 256, 1, 6, 4), (16, 512, 1, 4, 4), (64, 128, 2, 5, 4), (64, 256, 2, 3, 8),
                                 (64, 128, 1, 4, 4)]]
KERNEL_ROWS = linear_triton.MAX_M  # the kernel's rows by default (SWEEP's tiles); --max_m raises MAX_M
# above KERNEL_ROWS rows (--max_m): x's tile of all the rows takes as much shared memory as the weight's
# or more, so K tiles of 64. At 8K n = 256 the step runs wo and w2 on cuBLAS's addmm: 2268 us a step for their 64 calls
# (H100, profile-step.md), where their bytes alone take about 1280 us at 3.09 TB/s, and their products about as long
# at 795 TFLOP/s
SWEEP_ROWS = [Tiles(block_n=n, block_k=64, splits=p, stages=s, warps=nw)
              for n, p, s, nw in [(64, 1, 3, 4), (64, 2, 3, 4), (64, 2, 4, 8), (64, 4, 3, 8), (128, 1, 3, 8),
                                  (128, 2, 3, 8), (128, 4, 2, 8), (32, 2, 4, 4)]]


def time_us(fn, sets: list[tuple]) -> float:
    it = itertools.cycle(sets)  # the graph holds many calls, each on the next copy
    return 1e3 * triton.testing.do_bench_cudagraph(lambda: fn(*next(it)), return_mode="median")


INT4_GROUP = 128


def torch_int4(packed, scales_and_zeros):
    # PyTorch's own int4 matmul (tinygemm), on its tensor-core layout of the same weights
    inner_k_tiles = next(t for t in (8, 4, 2) if packed.shape[1] * 2 % (16 * t) == 0)
    weight = torch._convert_weight_to_int4pack(packed.contiguous(), inner_k_tiles)
    return lambda x: torch._weight_int4pack_mm(x, weight, INT4_GROUP, scales_and_zeros)


def cublas(x, w, s):
    return F.linear(x, w)


def plain_int8(x, w, s):  # quantize.Int8Linear's eager path
    return F.linear(x, w.to(x.dtype)) * s


def main(shapes: list[str], samples: list[int], weights: list[str], sweep: bool, output: str | None,
         tma: bool = False, max_m: int = linear_triton.MAX_M):
    linear_triton.MAX_M = max_m  # above it run_linear hands the rows to cuBLAS
    bw = read_bandwidth()
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}: read {bw / 1e9:.0f} GB/s")
    print("| layer | N | K | M | path | tiles | us | GB/s | % of read bandwidth |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in shapes:
        N, K = SHAPES[name]
        copies = max(2, (200 << 20) // (N * K) + 1)  # > 200 MB of int8 weights (twice that in bf16)
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]  # (N, K)
        qs = [torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8) for _ in range(copies)]  # (N, K)
        ss = [(torch.rand(N, device="cuda") * 1e-3).to(torch.bfloat16) for _ in range(copies)]  # (N,)
        q4 = [quantize.quantize_int4(w, INT4_GROUP) for w in ws]  # (N, K/2) uint8, (K/G, N, 2)
        torch_int4s = [torch_int4(*q) for q in q4]
        for M in samples:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)  # (M, K)
            kinds = {"bf16": ([(x, w, None) for w in ws], 2 * N * K), "int8": (list(zip([x] * copies, qs, ss)), N * K),
                     "int4": ([(x, *q) for q in q4], N * K // 2 + 4 * N * K // INT4_GROUP),
                     "torch int4": ([(x, mm) for mm in torch_int4s], N * K // 2 + 4 * N * K // INT4_GROUP)}
            expected = {"bf16": cublas(*kinds["bf16"][0][0]).float(), "int8": plain_int8(*kinds["int8"][0][0]).float(),
                        "int4": (x @ quantize.dequantize_int4(*q4[0], INT4_GROUP).t().to(x.dtype)).float()}
            expected["torch int4"] = expected["int4"]
            for kind in ("bf16", "int8", "int4"):
                kinds[kind + " swiglu"], expected[kind + " swiglu"] = kinds[kind], swiglu(expected[kind])
            default = lambda kind, sw=False: default_tiles(kind, N, M, n_sm, row_tiles_on(x.device), sw, K)
            # --tma: bf16's and int8's tiles also with the weight through a tensor descriptor (Tiles.tma)
            with_tma = lambda kind, ts: ts + [dataclasses.replace(t, tma=True) for t in ts if tma and kind != "int4"]
            others = SWEEP if M <= KERNEL_ROWS else SWEEP_ROWS
            tiles = lambda kind: with_tma(kind, [default(kind)] + [t for t in others if sweep and t != default(kind)])
            paths = ([("cublas", "bf16", cublas, None), ("plain int8", "int8", plain_int8, None),
                      ("torch int4", "torch int4", lambda x, mm: mm(x), None)]
                     + [(f"triton {kind}", kind, lambda *a, t=t: run_linear(*a, tiles=t), t) for kind in ("bf16", "int8")
                        if kind in weights for t in tiles(kind)]
                     + [("triton int4", "int4", lambda *a, t=t: run_linear(*a, tiles=t, group=INT4_GROUP), t)
                        for t in (tiles("int4") if "int4" in weights else [])]
                     + [(f"triton {kind} swiglu", f"{kind} swiglu", lambda *a, k=kind, t=t: run_linear(
                         *a, tiles=t, group=INT4_GROUP if k == "int4" else 0, swiglu=True), t)
                        for kind in weights if name.endswith("w13") for t in with_tma(kind, [default(kind, True)])]
                     + ([("cublas residual", "bf16 residual", lambda x, w, s: torch.addmm(res, x, w.t()), None)]
                        if name.endswith(("wo", "w2")) else [])  # the step's form above MAX_M rows
                     + [("triton bf16 residual", "bf16 residual", lambda x, w, s, t=t: run_linear(x, w, s, residual=res,
                                                                                                 tiles=t), t)
                        for t in (tiles("bf16") if "bf16" in weights and name.endswith(("wo", "w2")) else [])])
            res = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)  # (M, N)
            kinds["bf16 residual"], expected["bf16 residual"] = kinds["bf16"], expected["bf16"] + res.float()
            for path, kind, fn, t in paths:
                sets, nbytes = kinds[kind]
                try:
                    err = ((fn(*sets[0]).float() - expected[kind]).norm() / expected[kind].norm()).item()
                except triton.runtime.errors.OutOfResources as e:  # tiles too large for this GPU
                    print(f"| {name} | {N} | {K} | {M} | {path} | {t} | does not fit: {e} | | |")
                    continue
                except Exception as e:  # any other failure of one choice: the sweep goes on
                    first_line = str(e).split("\n")[0]
                    print(f"| {name} | {N} | {K} | {M} | {path} | {t} | failed: {type(e).__name__}: {first_line} | | |",
                          flush=True)
                    continue
                if err > 1e-2:  # a fast wrong variant is no candidate
                    print(f"| {name} | {N} | {K} | {M} | {path} | {t or ''} | wrong: relative error {err:.3g} | | |")
                    continue
                us = time_us(fn, sets)
                row = dict(layer=name, N=N, K=K, M=M, path=path, tiles=dataclasses.asdict(t) if t else None, us=us,
                           gbps=nbytes / us / 1e3, pct_of_bandwidth=100 * nbytes / (us * 1e-6) / bw)
                rows.append(row)
                print(f"| {name} | {N} | {K} | {M} | {path} | {t or ''} | {us:.1f} | {row['gbps']:.0f} "
                      f"| {row['pct_of_bandwidth']:.0f}% |", flush=True)
        del ws, qs, ss
    if sweep:  # the fastest tiles of each kernel, beside the baselines
        print("\nbest tiles:\n\n| layer | M | path | tiles | us | % of read bandwidth | cuBLAS us | plain int8 us "
              "| torch int4 us |")
        print("|---|---|---|---|---|---|---|---|---|")
        us = {(r["layer"], r["M"], r["path"]): r["us"] for r in rows if r["tiles"] is None}
        for (name, M, path), group in itertools.groupby(rows, key=lambda r: (r["layer"], r["M"], r["path"])):
            if path.startswith("triton"):
                best = min(group, key=lambda r: r["us"])
                base = "cublas residual" if path.endswith("residual") else "cublas"  # the same sum
                print(f"| {name} | {M} | {path} | {Tiles(**best['tiles'])} | {best['us']:.1f} | "
                      f"{best['pct_of_bandwidth']:.0f}% | {us[name, M, base]:.1f} | {us[name, M, 'plain int8']:.1f} "
                      f"| {us[name, M, 'torch int4']:.1f} |")
    if output:
        write_results(output, bw, rows)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Time one decode-step linear layer on a GPU.")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--samples", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--weights", nargs="+", choices=["bf16", "int8", "int4"], default=["bf16", "int8", "int4"],
                   help="weights of the Triton kernel to time (the baselines are always timed)")
    p.add_argument("--sweep", action="store_true",
                   help=f"also time {len(SWEEP)} other tile choices ({len(SWEEP_ROWS)} above {KERNEL_ROWS} rows)")
    p.add_argument("--tma", action="store_true", help="also each bf16 and int8 tile choice with Tiles.tma")
    p.add_argument("--max_m", type=int, default=linear_triton.MAX_M,
                   help="rows up to which the Triton kernel runs (linear_triton.MAX_M; above it, cuBLAS)")
    p.add_argument("--output", help="write every number to this JSON file")
    args = p.parse_args()
    main(**vars(args))
