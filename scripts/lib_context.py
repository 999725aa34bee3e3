# The context part of one layer's decode attention at many rows: our context launch against PyTorch's cuDNN
# and flash attention, each given the R = n g query rows of a KV head as its query and the context split in
# S equal parts over the batch axis (S partial outputs and their log-sum-exp, as ours); each checked, merged,
# against an fp32 reference (bench/results/h100-80gb-hbm3/lib-context.md).
#
#   python scripts/lib_context.py --output lib-context.json
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, as a script

import torch

from bench_attention import time_us  # exits without a CUDA GPU
from bifurcated import merge_partials, partial_attention
from bifurcated_triton import Tiles, context_partials

# (KV heads, context, n): 32 query heads of 128 dims
SHAPES = [(32, 8192, 256), (32, 8192, 512), (8, 8192, 64), (8, 8192, 256), (32, 4096, 512), (32, 8192, 32)]
SPLITS = (1, 2, 4, 8)


def ours(q, k, v):
    return context_partials(q, k, v, Tiles(cudnn=False))  # (P, Hkv, R, D), (P, Hkv, R) in log2


def merged_ours(q, k, v):
    o, l = ours(q, k, v)
    return merge_partials(list(zip(o, l * math.log(2))))  # (Hkv, R, D)


def library(kind: str, S: int, q, k, v):
    """cuDNN's or flash attention over S equal splits of the context: (S, Hkv, R, D), lse natural log."""
    n, H, _, D = q.shape  # q (n, H, 1, D); k, v (Hkv, M, D)
    Hkv, M, _ = k.shape
    R = n * H // Hkv
    qs = q.view(n, Hkv, H // Hkv, D).permute(1, 0, 2, 3).reshape(Hkv, R, D)  # row r = i g + h
    qs = qs.unsqueeze(0).expand(S, Hkv, R, D)  # (S, Hkv, R, D)
    ks = k.view(Hkv, S, M // S, D).permute(1, 0, 2, 3)  # (S, Hkv, M / S, D)
    vs = v.view(Hkv, S, M // S, D).permute(1, 0, 2, 3)  # (S, Hkv, M / S, D)
    if kind == "cudnn":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(qs, ks, vs, None, True, 0.0, False, False)
    else:
        r = torch.ops.aten._scaled_dot_product_flash_attention(qs.contiguous(), ks, vs)
    return r[0], r[1]


def merged_library(kind: str, S: int, q, k, v):
    o, l = library(kind, S, q, k, v)
    return merge_partials(list(zip(o.float(), l.reshape(S, o.size(1), o.size(2)).float())))  # (Hkv, R, D)


def reference(q, k, v):
    n, H, _, D = q.shape
    Hkv = k.size(0)
    qq = q.view(n, Hkv, H // Hkv, D).permute(1, 0, 2, 3).reshape(Hkv, n * H // Hkv, D)  # (Hkv, R, D)
    return partial_attention(qq.float(), k.float(), v.float())[0]  # (Hkv, R, D), the plain-PyTorch path


def main(output: str | None) -> list[dict]:
    rows, H, D = [], 32, 128
    for Hkv, M, n in SHAPES:
        rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
        sets = [(rnd(n, H, 1, D), rnd(Hkv, M, D), rnd(Hkv, M, D)) for _ in range(3)]
        ref = reference(*sets[0])
        flops = 4 * H * n * M * D
        for kind, S in [("ours", 0)] + [(kind, S) for kind in ("cudnn", "flash") for S in SPLITS]:
            run = ours if kind == "ours" else lambda q, k, v, kind=kind, S=S: library(kind, S, q, k, v)
            merged = merged_ours if kind == "ours" else lambda q, k, v, kind=kind, S=S: merged_library(kind, S, q, k, v)
            try:
                err = ((merged(*sets[0]) - ref).norm() / ref.norm()).item()
                us = time_us(run, sets)
            except RuntimeError as e:  # a shape the library does not take
                print(f"Hkv {Hkv} M {M} n {n} {kind} S={S}: failed: {str(e)[:200]}", flush=True)
                continue
            row = dict(kv_heads=Hkv, context=M, n=n, kind=kind, splits=S, us=us, tflops=flops / us / 1e6, rel_err=err)
            rows.append(row)
            print(f"Hkv {Hkv} M {M} n {n} {kind} S={S}: {us:.1f} us {row['tflops']:.0f} TFLOP/s err {err:.2e}",
                  flush=True)
    if output:
        result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows)
        Path(output).write_text(json.dumps(result, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Our context launch against cuDNN's and flash attention, one layer.")
    p.add_argument("--output", help="write every row to this JSON file")
    main(**vars(p.parse_args()))
