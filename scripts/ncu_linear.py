# One decode-step linear layer, launched as the step launches it (default tiles; w13 with its SwiGLU, wo and
# w2 with the residual add), a few times, so that Nsight Compute can read the hardware counters of one
# launch of `_linear_kernel`: where its warps stall, how full the memory pipes are. Run under ncu:
#
#   ncu --clock-control none --kernel-name regex:_linear_kernel --launch-skip 2 --launch-count 1 \
#       --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
#       python scripts/ncu_linear.py int8 w13 32
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, as a script

import torch

import quantize
from bench_linear import SHAPES
from linear_triton import run_linear


def main(kind: str, layer: str, rows: int, launches: int):
    N, K = SHAPES[layer]
    torch.manual_seed(0)
    x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)  # (M, K)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02  # (N, K)
    group, scales = 0, None
    if kind == "int8":
        w, scales = quantize.quantize_int8(w)
    elif kind == "int4":
        group = 128
        w, scales = quantize.quantize_int4(w, group)
    res = torch.randn(rows, N, device="cuda", dtype=torch.bfloat16) if layer in ("wo", "w2") else None
    for _ in range(launches):
        y = run_linear(x, w, scales, group=group, swiglu=layer == "w13", residual=res)
    torch.cuda.synchronize()
    print(f"{kind} {layer} {rows} rows: output {tuple(y.shape)}, {w.numel() * w.element_size() / 1e6:.1f} MB of weight")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Launch one decode-step linear layer a few times (for ncu).")
    p.add_argument("kind", choices=["bf16", "int8", "int4"])
    p.add_argument("layer", choices=list(SHAPES))
    p.add_argument("rows", type=int)
    p.add_argument("--launches", type=int, default=3)
    main(**vars(p.parse_args()))
