# One layer's decode attention alone, on a GPU: the Triton kernel (its default tiles, and others
# with --sweep) and the plain-PyTorch reference, against the bytes the step must read (the shared
# context once, each sample's filled decode slots, q and the output) over the read bandwidth
# measured in the same run; each variant is checked against the reference before it is timed.
# For tuning bifurcated_triton.py; scripts/benchmark.py times whole steps.
#
#   python scripts/bench_attention.py                     # Llama-2-7B heads (MHA) and Mistral-7B's (GQA)
#   python scripts/bench_attention.py --kv_heads 8 --contexts 8192 --samples 32 --sweep
#   python scripts/bench_attention.py --kv_heads 32 --samples 256 --filled 10 64 128   # early and late steps
#   python scripts/bench_attention.py --contexts 8192 --samples 1 32 64 --tma    # pointer loads vs the TMA
import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `import bifurcated` as a script

import torch

if not torch.cuda.is_available():  # before Triton, which CPU-only installs lack
    sys.exit("error: needs a CUDA GPU")
import triton.testing

import bifurcated_triton
from bifurcated import bifurcated_attention
from bifurcated_triton import Tiles, context_partials, context_plan, rows_tiles, run_decode_attention

T = 128  # decode capacity
SWEEP = [Tiles(max_rows=r, block_n=b, waves=w, stages=s, wide_rows=None, mid_rows=None)
         for r, b, w, s in itertools.product((64, 128), (32, 64, 128), (1, 2, 4), (3, 4))]


def read_bandwidth() -> float:
    x = torch.randn(1 << 31, device="cuda", dtype=torch.bfloat16)  # 4 GiB
    return x.numel() * 2 / (triton.testing.do_bench_cudagraph(x.sum, return_mode="min") * 1e-3)


def inputs(n: int, H: int, Hkv: int, M: int, D: int, filled: int, copies: int) -> list[tuple]:
    # several copies to rotate through, so that a context smaller than the L2 cache is still read
    # from memory, as in a real step where 32 layers' contexts pass through
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
    slot = torch.tensor([filled - 1], device="cuda")
    return [(rnd(n, H, 1, D), rnd(Hkv, M, D), rnd(Hkv, M, D), rnd(n, Hkv, T, D), rnd(n, Hkv, T, D), slot)
            for _ in range(copies)]


def time_us(fn, sets: list[tuple]) -> float:
    # replayed as a CUDA graph, as in a decode step: the time of the kernels, not of their launch
    def all_sets():
        for s in sets:
            fn(*s)
    return 1e3 * triton.testing.do_bench_cudagraph(all_sets, rep=100, return_mode="median") / len(sets)


def main(heads: int, kv_heads: list[int], head_dim: int, contexts: list[int], samples: list[int], filled: list[int],
         sweep: bool, output: str | None, tma: bool = False):
    bw = read_bandwidth()
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}: read {bw / 1e9:.0f} GB/s")
    print("| Hkv | M | n | filled | path | tiles (rows, splits, chunk) | us | GB/s | % of read bandwidth |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for Hkv, M, n, f in itertools.product(kv_heads, contexts, samples, filled):
        D, H = head_dim, heads
        nbytes = 2 * (2 * Hkv * M * D + 2 * n * Hkv * f * D + 2 * n * H * D)  # bf16
        sets = inputs(n, H, Hkv, M, D, f, copies=max(2, -(-(200 << 20) // nbytes)))
        tiles_list = [Tiles()] + (SWEEP if sweep else [])
        # --tma: each also with the context's blocks through tensor descriptors (Tiles.tma)
        tiles_list += [dataclasses.replace(t, tma=True) for t in tiles_list] if tma else []
        paths = [("reference", None)] + [("triton", t) for t in tiles_list]
        small = n * H * M <= 2**28  # else the reference's (Hkv, n g, M) fp32 scores would not fit
        expected = (bifurcated_attention if small else run_decode_attention)(*sets[0]).float()
        for name, tiles in paths:
            if name == "reference" and not small:
                continue
            # the path the decode op takes: with many MHA samples, the own slots on a second stream (side_rows)
            fn = bifurcated_attention if tiles is None else \
                lambda *a, t=tiles: run_decode_attention(*a, tiles=t, side=bifurcated_triton.side_rows(a[0], a[1]))
            try:
                err = ((fn(*sets[0]).float() - expected).norm() / expected.norm()).item()
            except triton.runtime.errors.OutOfResources as e:  # tiles too large for this GPU
                print(f"| {Hkv} | {M} | {n} | {f} | {name} | {tiles} | does not fit: {e} | | |")
                continue
            if err > 1e-2:  # a fast wrong variant is no candidate
                print(f"| {Hkv} | {M} | {n} | {f} | {name} | {tiles} | wrong: relative error {err:.3g} | | |")
                continue
            us = time_us(fn, sets)
            R = n * H // Hkv  # rows per KV head; the plan as run_decode_attention makes it
            plan = context_plan(R, M, Hkv, n_sm, rows_tiles(R, M, Hkv, n_sm, tiles)) if tiles else None
            row = dict(kv_heads=Hkv, context=M, n=n, filled=f, path=name,
                       tiles=dataclasses.asdict(tiles) if tiles else None, plan=plan, us=us, gbps=nbytes / us / 1e3,
                       pct_of_bandwidth=100 * nbytes / (us * 1e-6) / bw)
            rows.append(row)
            print(f"| {Hkv} | {M} | {n} | {f} | {name} | {plan or ''} {tiles or ''} | {us:.1f} | {row['gbps']:.0f} "
                  f"| {row['pct_of_bandwidth']:.0f}% |", flush=True)
            if tiles == Tiles():  # where its time goes: the context launch alone, then the samples' own slots
                row["context_us"] = time_us(context_partials, [s[:3] for s in sets])
                fused = bifurcated_triton.own_fused  # and the other way to take the own slots, in the same run
                row["own_fused"] = fused(plan[1], n, Hkv, T, n_sm)
                bifurcated_triton.own_fused = lambda *a: not fused(*a)
                row["other_own_us"] = time_us(fn, sets)
                bifurcated_triton.own_fused = fused
                mine, other = ("own + merge launch", "own split + merge launches") if row["own_fused"] else \
                    ("own split + merge launches", "own + merge launch")
                print(f"| | | | | context launch | | {row['context_us']:.1f} | | |\n"
                      f"| | | | | {mine} | | {us - row['context_us']:.1f} | | |\n"
                      f"| | | | | other way: {other}, total | | {row['other_own_us']:.1f} | | |", flush=True)
        del sets
    if output:
        write_results(output, bw, rows)


def write_results(path: str, bw: float, rows: list[dict]):  # every number, with the command and the GPU
    Path(path).write_text(json.dumps(dict(command=" ".join(["python"] + sys.argv), torch=torch.__version__,
                                          gpu=torch.cuda.get_device_name(), read_gbps=bw / 1e9, rows=rows), indent=1))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Time one layer's bifurcated decode attention on a GPU.")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv_heads", type=int, nargs="+", default=[32, 8])
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--samples", type=int, nargs="+", default=[1, 8, 32, 64, 256, 512])
    p.add_argument("--filled", type=int, nargs="+", default=[64], help="filled decode slots (of 128)")
    p.add_argument("--sweep", action="store_true", help="also time 36 other tile choices")
    p.add_argument("--tma", action="store_true", help="also each tile choice with Tiles.tma")
    p.add_argument("--own_share", type=int, help="bifurcated_triton.OWN_SHARE for this run (0: never)")
    p.add_argument("--row_block_n", type=int,
                   help="bifurcated_triton.ROW_BLOCK_N and SIDE_ROW_BLOCK_N for this run (16, 32, 64)")
    p.add_argument("--output", help="write every number to this JSON file")
    args = vars(p.parse_args())
    share, row_block_n = args.pop("own_share"), args.pop("row_block_n")
    if row_block_n is not None:  # keys a step of the own-row kernel (MHA)
        bifurcated_triton.ROW_BLOCK_N = bifurcated_triton.SIDE_ROW_BLOCK_N = row_block_n
    if share is not None:  # the samples' own slots in the context's programs where their share allows
        bifurcated_triton.OWN_SHARE = share or float("inf")
    main(**args)
