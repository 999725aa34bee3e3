# The decode step's linear layers, y = x W^T, in Triton, registered as a custom op so that
# torch.compile and CUDA graphs capture it. At decode x has few rows (M = n samples) and W is large,
# so the step is memory-bound: the kernel's one job is to stream W once at the memory's full
# bandwidth. Two kinds of weight, one kernel (the constexpr SCALED):
#   bf16: W (N, K);
#   int8 (w8a16): W (N, K) int8 and one scale per output channel (N,); the int8 tile is converted in
#   registers and the fp32 accumulator multiplied by the scale at the end, so 1 byte per weight is read;
#   int4 (w4a16, GROUP > 0): W (N, K/2) uint8, input channel 2i in the high nibble, and a scale and
#   zero point per group of GROUP input channels, S (K/GROUP, N, 2): w = (q - 8) scale + zero
#   (quantize.py's layout), unpacked and dequantized in registers: half a byte per weight.
# Each program owns BLOCK_N output channels of all M rows over one slice of K (split-K): the splits
# give every SM `waves` programs to stream even when N / BLOCK_N is smaller than the SM count. Each
# split writes its fp32 partial (P, M, N) and the wrapper sums them: deterministic (no atomics), no
# zero-fill, the (P, M, N) partials are small enough to stay in L2, and under torch.compile the sum
# fuses into the next op (the residual add, the activation). With one split the kernel writes y.
# Dimension letters: M rows of x (n samples), N output channels, K input channels, P splits of K.
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

MAX_M = 64  # above this (prefill) the product is compute-bound: cuBLAS does it


@triton.jit
def _linear_kernel(X, W, S, Out, M, N, K, CHUNK, SCALED: tl.constexpr, SWAP_AB: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    nb, split = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < M, cols < N
    start = split * CHUNK
    ks = start + tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * K + ks[None, :]  # (BLOCK_M, BLOCK_K)
    if GROUP:  # int4: BLOCK_K / 2 bytes of each row hold BLOCK_K weights
        w_ptrs = W + cols[:, None].to(tl.int64) * (K // 2) + start // 2 + tl.arange(0, BLOCK_K // 2)[None, :]
    else:
        w_ptrs = W + cols[:, None].to(tl.int64) * K + ks[None, :]  # (BLOCK_N, BLOCK_K)
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, CHUNK, BLOCK_K):  # whole K blocks; the last split's tail is masked
        kmask = ks + k0 < K
        x = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        # W is read once: evict it first, so that x and the partials keep their place in L2
        if GROUP:  # the tile lies in one group (GROUP is a multiple of BLOCK_K)
            bmask = start + k0 + 2 * tl.arange(0, BLOCK_K // 2) < K  # (BLOCK_K / 2,)
            b = tl.load(w_ptrs, mask=cmask[:, None] & bmask[None, :], other=0,
                        eviction_policy="evict_first").to(tl.int32)  # (BLOCK_N, BLOCK_K / 2)
            q = tl.interleave(b >> 4, b & 15).to(tl.float32)  # (BLOCK_N, BLOCK_K): high nibble first
            sz = S + ((start + k0) // GROUP * N + cols) * 2  # (BLOCK_N,) into (K / GROUP, N, 2)
            smask = cmask & (start + k0 < K)  # a tile past K (the last split's tail): weights 0
            scale = tl.load(sz, mask=smask, other=0.0).to(tl.float32)
            zero = tl.load(sz + 1, mask=smask, other=0.0).to(tl.float32)
            w = ((q - 8.0) * scale[:, None] + zero[:, None]).to(x.dtype)
        else:
            w = tl.load(w_ptrs, mask=cmask[:, None] & kmask[None, :], other=0.0, eviction_policy="evict_first")
            w = w.to(x.dtype)  # (BLOCK_N, BLOCK_K); int8 -> bf16 is exact, a no-op for bf16
        if SWAP_AB:  # y^T = W x^T: W's rows fill the MMA's 64-row side (Hopper's wgmma), x only 16+
            acc = tl.dot(w, tl.trans(x), acc)  # (BLOCK_N, BLOCK_M)
        else:
            acc = tl.dot(x, tl.trans(w), acc)  # (BLOCK_M, BLOCK_N)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2 if GROUP else BLOCK_K
    if SWAP_AB:
        acc = tl.trans(acc)  # (BLOCK_M, BLOCK_N)
    if SCALED and not GROUP:  # the per-channel scale commutes with the sum over K: once, in fp32
        acc *= tl.load(S + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out = Out + split * M * N + rows[:, None] * N + cols[None, :]  # (BLOCK_M, BLOCK_N) of (P, M, N)
    tl.store(out, acc.to(Out.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@dataclass(frozen=True)
class Tiles:
    """Launch parameters: the defaults serve the op; scripts/bench_linear.py times others."""
    block_n: int = 32  # output channels per program
    block_k: Optional[int] = None  # input channels per step; None: 256 bytes of a weight row (128 bf16, 256 int8)
    waves: int = 2  # programs per SM that the split of K aims for
    splits: Optional[int] = None  # splits of K; None: from `waves`
    stages: int = 4  # software-pipelining depth of the loads
    warps: int = 4
    swap_ab: bool = True  # compute y^T = W x^T (see the kernel)


def linear_plan(M: int, N: int, K: int, block_k: int, n_sm: int, tiles: Tiles = Tiles()) -> tuple[int, int, int]:
    """Rows per program, and how many splits of K give every SM `waves` programs to stream.
    Returns (BLOCK_M, P, chunk): P splits of chunk input channels each (whole K blocks)."""
    block_m = max(16, triton.next_power_of_2(M))  # the dot needs 16 at least
    col_blocks = triton.cdiv(N, tiles.block_n)
    splits = tiles.splits or triton.cdiv(tiles.waves * n_sm, col_blocks)
    splits = max(1, min(splits, triton.cdiv(K, block_k)))
    chunk = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    return block_m, triton.cdiv(K, chunk), chunk


def run_linear(x: Tensor, weight: Tensor, scales: Optional[Tensor], tiles: Tiles = Tiles(),
               group: int = 0) -> Tensor:
    # x (M, K); weight (N, K) bf16 or int8 with scales (N,) or None; or with group > 0, int4:
    # weight (N, K/2) uint8 and scales the scales and zero points (K/group, N, 2)
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] * (2 if group else 1) != K:
        raise ValueError(f"x has {K} input channels, the weight {weight.shape[1] * (2 if group else 1)}")
    if K % 16:  # keeps the K mask constant over 16 channels, so that loads stay vectorized
        raise ValueError(f"linear_triton needs K a multiple of 16, got {K}")
    if M > MAX_M:
        if group:
            raise ValueError(f"int4 weights take at most {MAX_M} rows here; dequantize them for more")
        y = F.linear(x, weight.to(x.dtype))  # (M, N)
        return y if scales is None else y * scales
    x = x.contiguous()
    block_k = min(group, tiles.block_k or 128) if group else tiles.block_k or 256 // weight.element_size()
    n_sm = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    block_m, P, chunk = linear_plan(M, N, K, block_k, n_sm, tiles)
    # one split: y itself, in x's dtype; else fp32 partials (P, M, N), summed below
    part = torch.empty((M, N) if P == 1 else (P, M, N), device=x.device,
                       dtype=x.dtype if P == 1 else torch.float32)
    torch.library.wrap_triton(_linear_kernel)[(triton.cdiv(N, tiles.block_n), P)](
        x, weight, weight if scales is None else scales, part, M, N, K, chunk,  # S unused if not SCALED
        SCALED=scales is not None, SWAP_AB=tiles.swap_ab, BLOCK_M=block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=block_k, GROUP=group, num_warps=tiles.warps, num_stages=tiles.stages)
    return part if P == 1 else part.sum(0).to(x.dtype)  # (M, N)


@torch.library.triton_op("linear_triton::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, scales: Optional[Tensor] = None) -> Tensor:
    # x (..., K); weight (N, K) bf16, or int8 with scales (N,); y in x's dtype
    y = run_linear(x.reshape(-1, x.shape[-1]), weight, scales)  # (M, N)
    return y.reshape(*x.shape[:-1], weight.shape[0])  # (..., N)
