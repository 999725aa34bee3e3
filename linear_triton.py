# The decode step's linear layers, y = x W^T, in Triton, registered as a custom op so that
# torch.compile and CUDA graphs capture it. At decode x has few rows (M = n samples) and W is large,
# so the step is memory-bound: the kernel's one job is to stream W once at the memory's full
# bandwidth. Three kinds of weight, one kernel (the constexprs SCALED and GROUP):
#   bf16: W (N, K);
#   int8 (w8a16): W (N, K) int8 and one scale per output channel (N,); the int8 tile is converted in
#   registers and the fp32 accumulator multiplied by the scale at the end, so 1 byte per weight is read;
#   the wide layers' tiles (Tiles.f16) take x in fp16 and turn the weights into fp16 by bit operations
#   (I8F16), or at 17 to 32 rows (Tiles.digits) x in two int8 digits a value, the weight going to the
#   tensor cores unconverted (DIGITS); the others into x's dtype by Triton's conversion;
#   int4 (w4a16, GROUP > 0): W (N, K/2) uint8, input channel 2i in the high nibble, and a scale and
#   zero point per group of GROUP input channels, S (K/GROUP, N, 2): w = (q - 8) scale + zero
#   (quantize.py's layout), half a byte per weight. With bf16 x on a GPU (groups of 64 or more) each
#   weight is dequantized to bf16 in registers (DEQ); else the raw nibbles are multiplied on the tensor
#   cores and each group's scale and zero point applied to the partial product. At one row (n = 1) int4
#   takes a kernel of its own on the CUDA cores (Tiles.gemv, _gemv_int4_kernel, up to GEMV_ROWS rows),
#   which streams whole rows and takes x as fp16 pairs: made by one op that Inductor fuses with the op
#   before, or, for w2, by w13's kernel itself (run_linear's pairs). Faster than PyTorch's int4 kernel in
#   the whole step on the H100 (bench/results/h100-80gb-hbm3/int4-gemv.md).
# Above MAX_M rows (prefill) the product is compute-bound: the weight goes to x's dtype (int8, int4:
# one Triton pass) and cuBLAS multiplies; an eager prefill gets there without the op (forward_linear).
# Each program owns BLOCK_N output channels of all M rows over one slice of K (split-K): the splits
# give every SM `waves` programs to stream even when N / BLOCK_N is smaller than the SM count. Each
# split writes its fp32 partial (P, M, N) and the wrapper sums them: deterministic (no atomics), no
# zero-fill, the (P, M, N) partials are small enough to stay in L2, and under torch.compile the sum
# fuses into the next op (the residual add, the activation). With one split the kernel writes y.
# With SWIGLU (the MLP's fused gate and up layer, w13 = [w1; w3]), each program takes BLOCK_N / 2 gate
# rows and the matching up rows, and writes silu(gate) * up: (M, N / 2), the activation never in memory.
# With a residual (wo and w2, whose output joins the residual stream), y = residual + x W^T in one
# rounding: in the kernel's epilogue (RESIDUAL) with one split, else added where the splits are summed.
# Dimension letters: M rows of x (n samples), N output channels, K input channels, P splits of K.
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

import tma as tma_ops
from model import RMSNorm, Transformer
from model import swiglu as swiglu_activation

# int4: the bits of the float BIAS with zero low bits, for x's dtype (BIAS + q exact for q < 16)
MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0), torch.float32: (0, 0.0)}
# x in fp16 for int8's f16 tiles: times 2^-X_SHIFT, so that bf16 activations up to 2^20 fit fp16's range;
# exact from 2^-10 up (fp16's normal numbers, times 16), below that within 2^-21: far under bf16's own
# rounding of x (2^-9 of each value)
X_SHIFT = 4
GEMV_ROWS = 1  # int4 up to this many rows (0 or 1): the CUDA-core kernel (Tiles.gemv); 0: PyTorch's (tinygemm)
MAX_M = 64  # above this (prefill) the product is compute-bound: cuBLAS does it
WIDE = 8192  # output channels from which a layer counts as wide (its tiles)
# the qkv layers whose kernel takes RoPE and the store of k and v (rope_operands): int8's (whole steps, 8K n = 32:
# 5.38 -> 5.33 ms); bf16's lost 0.04-0.07 ms there, though its kernel alone gained (H100, rope-in-qkv.md)
ROPE_KINDS = ("int8",)
NARROW = 4096  # bf16 layers from this many output channels take the kernel (128 programs of 32 fill the SMs)


# int4 with bf16 x on a GPU (DEQ): the weight read as int16 words, 4 nibbles each (input channels 4c
# in bits 4-7, 4c + 1 in 0-3, 4c + 2 in 12-15, 4c + 3 in 8-11: quantize.py's bytes, two at a time).
# For each 32-bit register of two words, 4 registers, register r holding channel 4c + r of both words:
# the pair of neighbours along K that the MMA operand takes, so nothing is reshuffled. Each weight:
# the bits 0x4300 | q are the bf16 128 + q, minus 136 is q - 8 exactly, then one fused multiply-add
# with the group's scale and zero point rounds w = (q - 8) scale + zero once to bf16. 4 products (x's
# channels 4c + r) into one accumulator: no row sums of x, no per-group epilogue; 286 instructions a
# K tile at 32 rows where the nibble products take 490 (scripts/sass_loop.py).
_DEQUANT_INT4 = " ".join((  # one line: torch.compile copies the string into its generated code
    "{",
    ".reg .b32 u0, u2, u3, a0, a1, a2, a3, one, off;",
    "mov.b32 one, 0x3F803F80;",
    "mov.b32 off, 0xC308C308;",
    "shr.b32 u0, $4, 4;",
    "shr.b32 u2, $4, 12;",
    "shr.b32 u3, $4, 8;",
    "lop3.b32 a0, u0, 0x000F000F, 0x43004300, 0xEA;",
    "lop3.b32 a1, $4, 0x000F000F, 0x43004300, 0xEA;",
    "lop3.b32 a2, u2, 0x000F000F, 0x43004300, 0xEA;",
    "lop3.b32 a3, u3, 0x000F000F, 0x43004300, 0xEA;",
    "fma.rn.bf16x2 a0, a0, one, off;",
    "fma.rn.bf16x2 a1, a1, one, off;",
    "fma.rn.bf16x2 a2, a2, one, off;",
    "fma.rn.bf16x2 a3, a3, one, off;",
    "fma.rn.bf16x2 $0, a0, $5, $6;",
    "fma.rn.bf16x2 $1, a1, $5, $6;",
    "fma.rn.bf16x2 $2, a2, $5, $6;",
    "fma.rn.bf16x2 $3, a3, $5, $6;",
    "}",
))


# int8 with x in fp16 (Tiles.f16): 4 weights of one 32-bit register to fp16 in 5 instructions, where
# Triton's conversion to bf16 takes 16 (a bf16 holds 8 significant bits, too few for a magic number over a
# whole byte). q ^ 0x80 is the byte q + 128; the bits 0x6400 | (q + 128) are the fp16 1024 + 128 + q, and
# 1152 off it is q, exact. The outputs keep the input's order: channels 4c, 4c + 1 in $0, 4c + 2, 4c + 3 in $1
_I8_TO_F16 = " ".join((
    "{",
    ".reg .b32 u, m;",
    "xor.b32 u, $2, 0x80808080;",
    "prmt.b32 $0, u, 0x64646464, 0x5140;",
    "prmt.b32 $1, u, 0x64646464, 0x5342;",
    "mov.b32 m, 0x64806480;",
    "sub.f16x2 $0, $0, m;",
    "sub.f16x2 $1, $1, m;",
    "}",
))


@triton.jit
def _dequant_int4(h, scale, zero, DEQ: tl.constexpr):
    # h (BLOCK_N, BLOCK_K / 4) int16 words; scale, zero (BLOCK_N, 1) bf16 -> 4 (BLOCK_N, BLOCK_K / 4)
    # tensors of bf16 bits, r: input channels 4c + r
    return tl.inline_asm_elementwise(asm=DEQ, constraints="=r,=r,=r,=r,r,r,r", args=[h, scale, zero],
                                     dtype=(tl.int16, tl.int16, tl.int16, tl.int16), is_pure=True, pack=2)


@triton.jit
def _program_channels(nb, N, BLOCK_N: tl.constexpr, SWIGLU: tl.constexpr, HALVES: tl.constexpr = False):
    # program nb's BLOCK_N output channels and their mask; with SWIGLU the weight's rows gate f, up f,
    # gate f + 1, up f + 1, ... (w13 = [w1; w3]: gate rows first, N / 2 of each), or with HALVES the
    # BLOCK_N / 2 gate rows, then the matching up rows
    i = tl.arange(0, BLOCK_N)
    if SWIGLU and HALVES:
        f = nb * (BLOCK_N // 2) + i % (BLOCK_N // 2)
        return f + (i // (BLOCK_N // 2)) * (N // 2), f < N // 2
    if SWIGLU:
        f = nb * (BLOCK_N // 2) + i // 2
        return f + (i % 2) * (N // 2), f < N // 2
    cols = nb * BLOCK_N + i
    return cols, cols < N


@triton.jit
def _silu_mul(gate, up):
    return gate * tl.sigmoid(gate) * up


@triton.jit
def _rope_freqs(Fr, rows, rmask, d, ROPE: tl.constexpr, ROPE_ROWS: tl.constexpr):
    # cos, sin of each pair (2i, 2i + 1) of channels d: (BLOCK_M, BLOCK_N) of each row's position (ROPE_ROWS), else
    # (1, BLOCK_N) of the one position all rows share (a decode step of the samples of one prompt)
    if ROPE_ROWS:
        rot = tl.load(Fr + rows[:, None] * ROPE + d[None, :], mask=rmask[:, None], other=0.0)
    else:
        rot = tl.load(Fr + d)[None, :]
    return rot.to(tl.float32)  # (one return: Triton types every return of a function alike, even untaken ones)


@triton.jit
def _linear_kernel(X, W, S, Out, Res, XL, XS, Fr, KD, VD, Slot, M, N, K, CHUNK, START, DST_ROW, DST_HEAD,
                   SCALED: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr,
                   SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, MAGIC: tl.constexpr = 0,
                   BIAS: tl.constexpr = 0.0, DEQ: tl.constexpr = None, I8F16: tl.constexpr = None,
                   X_SCALE: tl.constexpr = 1.0, XPERM: tl.constexpr = False,
                   TILES: tl.constexpr = 0, DIGITS: tl.constexpr = False, ROPE: tl.constexpr = 0,
                   QN: tl.constexpr = 0, KVN: tl.constexpr = 0, ROPE_ROWS: tl.constexpr = False,
                   TMA: tl.constexpr = False):
    # TMA: W is a TensorDescriptor (the Hopper's tensor memory accelerator copies its tiles; bf16, int8), of
    # (BLOCK_N, BLOCK_K) tiles, or with SWIGLU of W as (2, N / 2, K), tiles (2, BLOCK_N / 2, BLOCK_K): a tile's
    # gate rows, then its up rows
    nb, split = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols, cmask = _program_channels(nb, N, BLOCK_N, SWIGLU, TMA)
    rmask = rows < M
    start = split * CHUNK
    kk = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * K + start + kk[None, :]  # (BLOCK_M, BLOCK_K)
    if DEQ is not None:  # int4 as int16 words: BLOCK_K / 4 of each row hold BLOCK_K weights
        w_ptrs = (W.to(tl.pointer_type(tl.int16)) + cols[:, None].to(tl.int64) * (K // 4) + start // 4
                  + tl.arange(0, BLOCK_K // 4)[None, :])
    elif GROUP:  # int4: BLOCK_K / 2 bytes of each row hold BLOCK_K weights
        w_ptrs = W + cols[:, None].to(tl.int64) * (K // 2) + start // 2 + tl.arange(0, BLOCK_K // 2)[None, :]
    elif not TMA:  # (with TMA, W is a descriptor)
        w_ptrs = W + cols[:, None].to(tl.int64) * K + start + kk[None, :]  # (BLOCK_N, BLOCK_K)
    # the epilogue's loads go out first: at the end of the loop they would add a round trip to memory to
    # every program's tail
    if SCALED and not GROUP:
        col_scale = tl.load(S + cols, mask=cmask, other=0.0).to(tl.float32)  # (BLOCK_N,)
    if RESIDUAL:
        res = tl.load(Res + rows[:, None] * N + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    if DIGITS:  # x's scale of each row
        row_scale = tl.load(XS + rows, mask=rmask, other=0.0)  # (BLOCK_M,) fp32
    if ROPE:  # the tile's channels d of one head
        d = (nb * BLOCK_N) % ROPE + tl.arange(0, BLOCK_N)
        slot = tl.load(Slot) - START
        rot = _rope_freqs(Fr, rows, rmask, d, ROPE, ROPE_ROWS)
    # y^T = W x^T: W's rows fill the MMA's large side, x's few rows (padded to 16) the small one
    # (int8 with x in fp16, I8F16: x's rows the first operand, so that each warp converts weights of its own)
    acc = tl.zeros([BLOCK_M, BLOCK_N] if I8F16 is not None else [BLOCK_N, BLOCK_M], tl.float32)
    # int4 with x in the weight's order: the 4 phases' products into 4 accumulators, so that ptxas lets them
    # run together (one accumulator: Triton waits for each product; x split in registers: so does ptxas)
    acc1, acc2, acc3 = acc, acc, acc
    if DIGITS:  # int8 x int8 products of x's high and low digits, exact in int32
        xl_ptrs = XL + rows[:, None] * K + start + kk[None, :]  # (BLOCK_M, BLOCK_K)
        acc_hi = tl.zeros([BLOCK_N, BLOCK_M], tl.int32)
        acc_lo = tl.zeros([BLOCK_N, BLOCK_M], tl.int32)
    # whole K blocks up to K; masks along K only where K is not a multiple of BLOCK_K (a mask that
    # varies along a row would split the weight loads into narrow ones)
    # TILES (K tiles a split, all splits whole): a loop of fixed length, without the branch around a loop that
    # may not run, whose zeroing of the accumulators makes ptxas wait for each product (C7515)
    n_tiles = TILES if TILES else tl.cdiv(tl.minimum(start + CHUNK, K) - start, BLOCK_K)
    for i in range(0, n_tiles):
        k0 = start + i * BLOCK_K
        kmask = (k0 + kk < K)[None, :] if not EVEN_K else kk[None, :] < BLOCK_K  # (1, BLOCK_K)
        if not XPERM:
            x = tl.load(x_ptrs, mask=rmask[:, None] & kmask, other=0.0)  # (BLOCK_M, BLOCK_K)
        # W is read once: evict it first, so that x and the partials keep their place in L2 (a hint that Triton
        # 3.6 drops where it pipelines the load through cp.async, as in every tile kind's main loop here: no
        # createpolicy in their PTX)
        if DEQ is not None:  # the tile lies in one group: its weights in bf16, 4 products
            h = tl.load(w_ptrs, mask=cmask[:, None], other=0, eviction_policy="evict_first")  # (BLOCK_N, BLOCK_K / 4)
            # each column's scale and zero point as one 32-bit word, the scale in its low half: 32-bit loads
            # are pipelined with the weight's (16-bit ones are not: a round trip to memory every K tile)
            sz = tl.load(S.to(tl.pointer_type(tl.int32)) + k0 // GROUP * N + cols, mask=cmask, other=0)  # (BLOCK_N,)
            scale = (sz & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
            zero = (sz >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
            w0, w1, w2, w3 = _dequant_int4(h, scale[:, None], zero[:, None], DEQ)
            if XPERM:  # x's channels 4c + r at r BLOCK_K / 4 + c of each K tile (run_linear): 4 plain loads, which
                # go to shared memory and from there to the tensor cores as they are
                xq = X + rows[:, None] * K + k0 + tl.arange(0, BLOCK_K // 4)[None, :]  # (BLOCK_M, BLOCK_K / 4)
                x0 = tl.load(xq, mask=rmask[:, None], other=0.0)
                x1 = tl.load(xq + BLOCK_K // 4, mask=rmask[:, None], other=0.0)
                x2 = tl.load(xq + BLOCK_K // 2, mask=rmask[:, None], other=0.0)
                x3 = tl.load(xq + 3 * BLOCK_K // 4, mask=rmask[:, None], other=0.0)
                acc = tl.dot(w0.to(tl.bfloat16, bitcast=True), tl.trans(x0), acc)  # (BLOCK_N, BLOCK_M)
                acc1 = tl.dot(w1.to(tl.bfloat16, bitcast=True), tl.trans(x1), acc1)
                acc2 = tl.dot(w2.to(tl.bfloat16, bitcast=True), tl.trans(x2), acc2)
                acc3 = tl.dot(w3.to(tl.bfloat16, bitcast=True), tl.trans(x3), acc3)
            else:  # (the split goes from registers back to shared memory, a round trip every K tile)
                xa, xb = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 4, 2, 2)))  # channels 4c + (0, 2), 4c + (1, 3)
                x0, x2 = tl.split(xa)  # (BLOCK_M, BLOCK_K / 4) each
                x1, x3 = tl.split(xb)
                acc = tl.dot(w0.to(tl.bfloat16, bitcast=True), tl.trans(x0), acc)  # (BLOCK_N, BLOCK_M)
                acc = tl.dot(w1.to(tl.bfloat16, bitcast=True), tl.trans(x1), acc)
                acc = tl.dot(w2.to(tl.bfloat16, bitcast=True), tl.trans(x2), acc)
                acc = tl.dot(w3.to(tl.bfloat16, bitcast=True), tl.trans(x3), acc)
        elif GROUP:  # the tile lies in one group (K is whole groups, GROUP a multiple of BLOCK_K)
            b = tl.load(w_ptrs, mask=cmask[:, None], other=0, eviction_policy="evict_first")  # (BLOCK_N, BLOCK_K / 2) uint8
            # high nibbles hold the even input channels, low ones the odd: two products, no interleave
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))  # (BLOCK_M, BLOCK_K / 2) each
            # w = (q - 8) scale + zero, so x.w = scale (x.q) + (zero - 8 scale) sum(x): the tensor cores
            # take the nibbles, the group's scale and zero point the (BLOCK_N, BLOCK_M) tile only. A nibble
            # becomes a float without a conversion: the bits MAGIC | q are the float BIAS + q, exactly
            # (bf16: 0x4300 | q = 128 + q), and the BIAS comes back out with sum(x). MAGIC 0 (fp32 x, whose
            # bias 2^23 would eat the precision): converted as numbers
            if MAGIC:
                hi = ((b >> 4).to(tl.int16) | MAGIC).to(x.dtype, bitcast=True)  # (BLOCK_N, BLOCK_K / 2): BIAS + q
                lo = ((b & 15).to(tl.int16) | MAGIC).to(x.dtype, bitcast=True)
            else:
                hi, lo = (b >> 4).to(x.dtype), (b & 15).to(x.dtype)
            xq = tl.dot(hi, tl.trans(x_even))  # (BLOCK_N, BLOCK_M)
            xq = tl.dot(lo, tl.trans(x_odd), xq)
            sz = S + (k0 // GROUP * N + cols) * 2  # (BLOCK_N,) into (K / GROUP, N, 2)
            scale = tl.load(sz, mask=cmask, other=0.0).to(tl.float32)
            zero = tl.load(sz + 1, mask=cmask, other=0.0).to(tl.float32)
            xsum = tl.sum(x.to(tl.float32), axis=1)  # (BLOCK_M,)
            acc += xq * scale[:, None] + (zero - (8.0 + BIAS) * scale)[:, None] * xsum[None, :]
        else:
            if TMA and SWIGLU:  # rows past N / 2 or K: zeros
                w = tl.reshape(W.load([0, nb * (BLOCK_N // 2), k0]), (BLOCK_N, BLOCK_K))
            elif TMA:
                w = W.load([nb * BLOCK_N, k0])
            else:
                w = tl.load(w_ptrs, mask=cmask[:, None] & kmask, other=0.0, eviction_policy="evict_first")
            if I8F16 is not None:  # x in fp16 (times 1 / X_SCALE): the weights by I8F16's bit operations
                w = tl.inline_asm_elementwise(asm=I8F16, constraints="=r,=r,r", args=[w], dtype=tl.float16,
                                              is_pure=True, pack=4)
                acc = tl.dot(x, tl.trans(w), acc)  # (BLOCK_M, BLOCK_N)
            elif DIGITS:  # x: the high digits, XL the low ones. The weight goes to the tensor cores as it is
                x_lo = tl.load(xl_ptrs, mask=rmask[:, None] & kmask, other=0)  # (BLOCK_M, BLOCK_K)
                xl_ptrs += BLOCK_K
                acc_hi = tl.dot(w, tl.trans(x), acc_hi, out_dtype=tl.int32)  # (BLOCK_N, BLOCK_M)
                acc_lo = tl.dot(w, tl.trans(x_lo), acc_lo, out_dtype=tl.int32)
            else:
                acc = tl.dot(w.to(x.dtype), tl.trans(x), acc)  # (BLOCK_N, BLOCK_M); int8 -> bf16 is exact
        x_ptrs += BLOCK_K
        if not TMA:
            w_ptrs += BLOCK_K // 4 if DEQ is not None else BLOCK_K // 2 if GROUP else BLOCK_K
    if XPERM:
        acc = (acc + acc1) + (acc2 + acc3)
    if DIGITS:  # x = (256 hi + lo) row_scale; 256 hi . w alone could overflow int32
        acc = acc_hi.to(tl.float32) * 256.0 + acc_lo.to(tl.float32)
    if I8F16 is None:
        acc = tl.trans(acc)  # (BLOCK_M, BLOCK_N)
    if SCALED and not GROUP:  # the per-channel scale commutes with the sum over K: once, in fp32
        acc *= col_scale[None, :] * X_SCALE  # X_SCALE: x's scale back (I8F16)
    if DIGITS:
        acc *= row_scale[:, None]
    if SWIGLU:  # one split: y (M, N / 2) = silu(gate) * up
        if TMA:  # the tile's gate channels, then its up channels
            gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        else:
            gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))  # (BLOCK_M, BLOCK_N / 2) each
        f = nb * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(Out + rows[:, None] * (N // 2) + f[None, :], _silu_mul(gate, up).to(Out.dtype.element_ty),
                 mask=rmask[:, None] & (f < N // 2)[None, :])
    else:
        omask = rmask[:, None] & cmask[None, :]
        if RESIDUAL:  # one split: y = residual + x W^T, rounded once
            acc += res.to(tl.float32)
        if ROPE:  # one split, [q; k; v] heads of ROPE channels: RoPE on q and k in fp32, q to Out (M, QN), k and v
            # to slot `slot` of row i's heads in KD, VD (at i DST_ROW + head DST_HEAD + slot ROPE)
            c0 = nb * BLOCK_N  # the tile lies in one head
            a0, a1 = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
            cos, sin = tl.split(tl.reshape(rot, (BLOCK_M if ROPE_ROWS else 1, BLOCK_N // 2, 2)))
            rotated = tl.reshape(tl.join(a0 * cos - a1 * sin, a1 * cos + a0 * sin), (BLOCK_M, BLOCK_N))
            y = tl.where(c0 < QN + KVN, rotated, acc).to(Out.dtype.element_ty)
            tl.store(Out + rows[:, None] * QN + cols[None, :], y, mask=omask & (c0 < QN))
            head = tl.maximum(c0 - QN, 0) // ROPE  # k heads, then v heads
            is_v = head >= KVN // ROPE
            dst = (rows[:, None].to(tl.int64) * DST_ROW + (head - is_v * (KVN // ROPE)) * DST_HEAD + slot * ROPE
                   + d[None, :])
            tl.store(KD + dst, y, mask=omask & (c0 >= QN) & ~is_v)
            tl.store(VD + dst, y, mask=omask & is_v)
        else:
            out = Out + split * M * N + rows[:, None] * N + cols[None, :]  # (BLOCK_M, BLOCK_N) of (P, M, N)
            tl.store(out, acc.to(Out.dtype.element_ty), mask=omask)


# int4 at one row (GEMV: n = 1 decoding) on the CUDA cores, where the tensor-core kernel's 16-row tile
# wastes 15 rows and reshuffles the weight through shared memory. A program streams a few whole rows,
# which lie next to each other in memory (no splits of K: the epilogue adds the residual or applies the
# activation); each thread loads 16 bytes of a row at a time as four 32-bit words, 8 nibbles each. Nibble
# t of word c is input channel 8c + (t ^ 1) (quantize.py's bytes: channel 2i in the high nibble). Packed
# fp16 arithmetic, no conversion instruction: two nibbles a LOP3 as the halves 1024 + q (bits 0-3 and
# 16-19) or 1024 + 16 q (bits 4-7, 20-23), to q - 8 exactly by one HFMA2, times x's fp16 pairs by four
# more, and the sum of the word's 8 x by three packed adds: about 28 instructions a word
# (scripts/sass_loop.py gemv). w = (q - 8) scale + zero, so x.w = scale x.(q - 8) + zero sum(x), per group.
# x comes scaled by 2^-GEMV_SHIFT (fp16 holds bf16's values exactly from 2^-14 up, times 2^GEMV_SHIFT; a
# word's 8 products stay below fp16's largest number while |x| < 2^(GEMV_SHIFT + 10)), its pairs in the
# nibbles' order (gemv_input); a word's two halves are added in fp16 and the sums go on in fp32.
def _word_asm() -> str:
    lines = ["{", ".reg .b32 h, a, b, c, d, m, o, s, f;", ".reg .b16 lo, hi;", "mov.b32 m, 0x64006400;",
             "mov.b32 o, 0x64086408;", "mov.b32 s, 0x2C002C00;", "mov.b32 f, 0xD480D480;", "shr.u32 h, $2, 8;",
             "lop3.b32 a, $2, 0x000F000F, m, 0xEA;", "lop3.b32 b, $2, 0x00F000F0, m, 0xEA;",
             "lop3.b32 c, h, 0x000F000F, m, 0xEA;", "lop3.b32 d, h, 0x00F000F0, m, 0xEA;",
             "sub.rn.f16x2 a, a, o;", "fma.rn.f16x2 b, b, s, f;", "sub.rn.f16x2 c, c, o;", "fma.rn.f16x2 d, d, s, f;",
             "mul.rn.f16x2 a, a, $3;", "fma.rn.f16x2 a, b, $4, a;", "fma.rn.f16x2 a, c, $5, a;",
             "fma.rn.f16x2 a, d, $6, a;", "mov.b32 {lo, hi}, a;", "add.rn.f16 lo, lo, hi;", "cvt.f32.f16 $0, lo;",
             # the sum of the word's 8 x, for the zero points
             "add.rn.f16x2 a, $3, $4;", "add.rn.f16x2 b, $5, $6;", "add.rn.f16x2 a, a, b;", "mov.b32 {lo, hi}, a;",
             "add.rn.f16 lo, lo, hi;", "cvt.f32.f16 $1, lo;", "}"]
    return " ".join(lines)


_WORD = _word_asm()
GEMV_SHIFT = 8


@triton.jit
def _half_pair(p, w, T: tl.constexpr):
    # the interpreter's way: x's fp16 pair p (nibbles T and T + 4 of w): its products with those nibbles - 8
    # and its sum, in fp32
    lo = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dot = lo * (((w >> (4 * T)) & 15) - 8).to(tl.float32) + hi * (((w >> (4 * T + 16)) & 15) - 8).to(tl.float32)
    return dot, lo + hi


@triton.jit
def _word(w, p0, p1, p2, p3, WORD: tl.constexpr):
    # over a word's 8 channels: the sum of (q - 8) x, and of x; x's pairs p0-p3 (nibbles 0 and 4, 1 and 5, 2 and
    # 6, 3 and 7)
    if WORD is not None:
        return tl.inline_asm_elementwise(asm=WORD, constraints="=r,=r,r,r,r,r,r", args=[w, p0, p1, p2, p3],
                                         dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    d0, s0 = _half_pair(p0, w, 0)
    d1, s1 = _half_pair(p1, w, 1)
    d2, s2 = _half_pair(p2, w, 2)
    d3, s3 = _half_pair(p3, w, 3)
    return d0 + d1 + d2 + d3, s0 + s1 + s2 + s3


@triton.jit
def _gemv_int4_kernel(XP, W, S, Out, Res, N, KG, KW: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_G: tl.constexpr, GROUP: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                      EVEN_N: tl.constexpr, EVEN_G: tl.constexpr, X_SCALE: tl.constexpr, WORD: tl.constexpr,
                      PAIRS: tl.constexpr = False, ROUND_BF16: tl.constexpr = False):
    # XP (4, KW) int32 (gemv_input's int16, read in pairs): [t, c] x's fp16 pair for nibbles t and t + 4 of word
    # c (scaled by 2^-GEMV_SHIFT);
    # W (N, KW) int32 words; S as run_linear's; KG groups in a row. Each program:
    # BLOCK_N whole rows, BLOCK_G groups of each a step, as a (BLOCK_N, BLOCK_G, BW) tile of words whose
    # rows lie next to each other in memory: one contiguous stretch a step where a step is a whole row.
    # PAIRS (with SWIGLU): Out (N / 2,) int16 takes the activations as the next layer's XP (gemv_input's)
    BW: tl.constexpr = GROUP // 8  # words of a row per group
    nb = tl.program_id(0)
    cols, cmask = _program_channels(nb, N, BLOCK_N, SWIGLU)
    g = tl.arange(0, BLOCK_G)
    c = tl.arange(0, BW)
    r3 = cols[:, None, None].to(tl.int64) * KW  # (BLOCK_N, 1, 1)
    gc = g[None, :, None] * BW + c[None, None, :]  # (1, BLOCK_G, BW): a word's place in the step
    w_ptrs = W.to(tl.pointer_type(tl.int32)) + r3 + gc
    x_ptrs = XP.to(tl.pointer_type(tl.int32)) + gc + 0 * r3  # in the weight tile's shape: no layout conversion
    s_ptrs = S.to(tl.pointer_type(tl.int32)) + g[None, :] * N + cols[:, None]  # (BLOCK_N, BLOCK_G) (scale, zero)
    acc = tl.zeros([BLOCK_N, BLOCK_G, BW], tl.float32)  # (q - 8) x times the scales
    zacc = tl.zeros([BLOCK_N, BLOCK_G, BW], tl.float32)  # x times the zero points
    for g0 in range(0, KG, BLOCK_G):
        if EVEN_N and EVEN_G:  # no masks: a masked load first zeroes its registers
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            sz = tl.load(s_ptrs)
            p0, p1, p2, p3 = tl.load(x_ptrs), tl.load(x_ptrs + KW), tl.load(x_ptrs + 2 * KW), tl.load(x_ptrs + 3 * KW)
        else:
            gmask = (g0 + g < KG)[None, :] & cmask[:, None]  # (BLOCK_N, BLOCK_G)
            w = tl.load(w_ptrs, mask=gmask[:, :, None], other=0, eviction_policy="evict_first")
            sz = tl.load(s_ptrs, mask=gmask, other=0)
            m = gmask[:, :, None]
            p0, p1 = tl.load(x_ptrs, mask=m, other=0), tl.load(x_ptrs + KW, mask=m, other=0)
            p2, p3 = tl.load(x_ptrs + 2 * KW, mask=m, other=0), tl.load(x_ptrs + 3 * KW, mask=m, other=0)
        dot, xsum = _word(w, p0, p1, p2, p3, WORD)
        acc += dot * (sz << 16).to(tl.float32, bitcast=True)[:, :, None]  # the scale: bf16 in the low half
        zacc += xsum * (sz & -65536).to(tl.float32, bitcast=True)[:, :, None]
        w_ptrs += BLOCK_G * BW
        x_ptrs += BLOCK_G * BW
        s_ptrs += BLOCK_G * N
    y = tl.sum(tl.sum(acc + zacc, axis=2), axis=1) * X_SCALE  # (BLOCK_N,)
    if SWIGLU:  # y (N / 2,) = silu(gate) * up
        gate, up = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
        f = nb * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        act = _silu_mul(gate, up)
        if PAIRS:  # gemv_input's op: rounded as the activations would be, scaled, to fp16; channel f is half
            # f % 8 // 4 of pair (f % 4) ^ 1 of word f // 8 (N / 16 words a pair)
            act = (act.to(tl.bfloat16).to(tl.float32) if ROUND_BF16 else act) * (1.0 / X_SCALE)
            half = 2 * (((f % 4) ^ 1) * (N // 16) + f // 8) + f % 8 // 4
            tl.store(Out + half, act.to(tl.float16).to(tl.int16, bitcast=True), mask=f < N // 2)
        else:
            tl.store(Out + f, act.to(Out.dtype.element_ty), mask=f < N // 2)
    else:
        if RESIDUAL:  # y = residual + x W^T, rounded once
            y += tl.load(Res + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(Out + cols, y.to(Out.dtype.element_ty), mask=cmask)


@triton.jit
def _dequant_int4_kernel(W, S, Out, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    # one group of GROUP input channels of BLOCK_N output channels: (BLOCK_N, GROUP) weights out
    nb, grp = tl.program_id(0), tl.program_id(1)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols[:, None] < N
    b = tl.load(W + cols[:, None].to(tl.int64) * (K // 2) + grp * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :],
                mask=cmask, other=0)  # (BLOCK_N, GROUP / 2) uint8
    q = tl.interleave(b >> 4, b & 15).to(tl.float32)  # (BLOCK_N, GROUP)
    sz = S + (grp * N + cols) * 2  # (BLOCK_N,) into (K / GROUP, N, 2)
    scale = tl.load(sz, mask=cols < N, other=0.0).to(tl.float32)
    zero = tl.load(sz + 1, mask=cols < N, other=0.0).to(tl.float32)
    w = (q - 8.0) * scale[:, None] + zero[:, None]  # (BLOCK_N, GROUP), as quantize.dequantize_int4
    offs = cols[:, None].to(tl.int64) * K + grp * GROUP + tl.arange(0, GROUP)[None, :]
    tl.store(Out + offs, w.to(Out.dtype.element_ty), mask=cmask)


@triton.jit
def _dequant_int8_kernel(W, S, Out, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # (BLOCK_N, BLOCK_K) int8 weights times their rows' scales, in Out's dtype
    nb, kb = tl.program_id(0), tl.program_id(1)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (cols < N)[:, None] & (kk < K)[None, :]
    offs = cols[:, None].to(tl.int64) * K + kk[None, :]
    scale = tl.load(S + cols, mask=cols < N, other=0.0).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0).to(tl.float32) * scale[:, None]  # exact: 8 bits times 8
    tl.store(Out + offs, w.to(Out.dtype.element_ty), mask=mask)


# The prefill's neighbours of the products, run eagerly: PyTorch takes 8 kernels for an RMSNorm and 2
# for a SwiGLU, each a pass over the activations and a launch from the host (a 1K-token prefill was
# bound by its launches: profile-prefill.md). One kernel each, with the same roundings as model.py:
# the norm in fp32, rounded to x's dtype, then times the gain; silu(gate) rounded, then times up.
@triton.jit
def _rms_norm_kernel(X, W, Y, C, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    x = tl.load(X + row * C + c, mask=c < C, other=0.0).to(tl.float32)  # (BLOCK,)
    y = (x * tl.math.rsqrt(tl.sum(x * x, axis=0) / C + eps)).to(X.dtype.element_ty)  # type_as(x)
    w = tl.load(W + c, mask=c < C, other=0.0)
    tl.store(Y + row * C + c, (y.to(tl.float32) * w.to(tl.float32)).to(Y.dtype.element_ty), mask=c < C)


@triton.jit
def _swiglu_kernel(H, Y, F, BLOCK: tl.constexpr):
    # row `row` of H (rows, 2F) = [gate; up] -> silu(gate) * up, (rows, F)
    row, cb = tl.program_id(0).to(tl.int64), tl.program_id(1)
    c = cb * BLOCK + tl.arange(0, BLOCK)
    gate = tl.load(H + row * 2 * F + c, mask=c < F, other=0.0).to(tl.float32)
    up = tl.load(H + row * 2 * F + F + c, mask=c < F, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty)
    tl.store(Y + row * F + c, (act.to(tl.float32) * up.to(tl.float32)).to(Y.dtype.element_ty), mask=c < F)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """model.RMSNorm in one kernel: x (..., C), weight (C,). Eager only (TritonRMSNorm): launched as it is."""
    C, x = x.shape[-1], x.contiguous()
    y = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    _rms_norm_kernel[(x.numel() // C,)](x, weight, y, C, eps, BLOCK=triton.next_power_of_2(C), num_warps=8)
    return y


def swiglu_rows(h: Tensor) -> Tensor:
    """model.swiglu in one kernel: h (M, 2F) -> (M, F). Eager only (dense_linear): launched as it is."""
    M, F, h = h.shape[0], h.shape[1] // 2, h.contiguous()
    y = torch.empty(M, F, device=h.device, dtype=h.dtype)
    block = 1024
    _swiglu_kernel[(M, triton.cdiv(F, block))](h, y, F, BLOCK=block, num_warps=4)
    return y


@dataclass(frozen=True)
class Tiles:
    """Launch parameters; default_tiles picks them per kind of weight, scripts/bench_linear.py times others."""
    block_n: int = 32  # output channels per program
    block_k: Optional[int] = None  # input channels per step; None: 256 bytes of a weight row (128 bf16, 256 int8)
    waves: int = 2  # programs per SM that the split of K aims for
    splits: Optional[int] = None  # splits of K; None: from `waves`
    stages: int = 4  # software-pipelining depth of the loads
    warps: int = 4
    f16: bool = False  # int8: x in fp16 and the weights into fp16 by bit operations (I8F16); on a GPU
    gemv: bool = False  # int4 at one row: the CUDA-core kernel (_gemv_int4_kernel), block_k / group groups a step
    xperm: bool = False  # int4 with bf16 x on a GPU: x's channels in the order of the dequantized weight (DEQ)
    digits: bool = False  # int8: x as two int8 digits of a 16-bit fixed point a row, int8 products (DIGITS)
    tma: bool = False  # bf16, int8: the weight's tiles copied by the tensor memory accelerator (TMA), on a GPU


# GPUs whose bf16 tiles from 17 rows are default_tiles' own (row_tiles=True): there they were measured
# faster in whole steps (H200, bench/results/h200/tiles-ab.md); on an H100 they were slower than the
# 16-row tiles (8K n = 32 7.46 -> 7.33 ms without them, n = 64 8.20 -> 8.01, Mistral-7B n = 32 6.64 ->
# 6.48: bench/results/h100-80gb-hbm3/tiles-ab.md), so other GPUs keep those
ROW_TILE_GPUS = ("H200",)


def row_tiles_on(device: torch.device) -> bool:
    """Whether default_tiles' tiles by rows are the ones for this device: on a CPU (Triton's interpreter)
    they are, so that the tests run them."""
    # (the properties' name, not get_device_name, which torch.compile cannot trace: rope_operands runs in the model)
    return device.type != "cuda" or any(g in torch.cuda.get_device_properties(device).name for g in ROW_TILE_GPUS)


def default_tiles(kind: str, N: int, M: int = 1, n_sm: int = 132, row_tiles: bool = True,
                  swiglu: bool = False, K: int = 0) -> Tiles:
    # The fastest of `scripts/bench_linear.py --sweep` on an H100 for Llama-2-7B's decode shapes at
    # 1 and 32 rows (bench/results/h100-80gb-hbm3/linear.md, linear-narrow.md): wide layers (wqkv, w13)
    # stream best with few, long programs; narrow bf16 ones (wo, w2: N = 4096) with one wave of 128
    # programs that each stream 32 whole rows (no splits of K, so the residual add fits the epilogue).
    # From 17 rows (the dot's 32) x takes as much shared memory as W: bf16 tiles with fewer stages, so
    # that two programs fit an SM, or 128 channels a program where that still gives every SM one (H200,
    # 32 rows: w13 49.6 -> 46.4 us, wqkv 28.9 -> 26.9; 64 rows: w13 52.8 -> 48.2, wo 16.3 -> 14.2;
    # bench/results/h200/linear-rows.md)
    # int8 wide layers (wqkv, w13) take x in fp16: its conversion joins the norm before them under
    # torch.compile; whole steps at 8K n = 32, int8, one process: 5.79 ms with none, 5.57-5.59 with w13, 5.52
    # with both, 5.57 with wo and w2 too, whose x comes from Triton kernels and so needs a conversion kernel
    # (H100, bench/results/h100-80gb-hbm3/int8-f16.md). At 17 to 32 rows they take x in int8 digits instead
    # (Tiles.digits: int8 products, the weight never converted), 64 channels a program: alone, against the weight
    # converted to bf16, wqkv 23.5 -> 21.2 us, w13 47.8 -> 34.4; whole steps at 8K n = 32 against x in fp16:
    # 5.449 -> 5.380 ms (H100, int8-digits.md); wqkv with K tiles of 256: 5.50 -> 5.47 (narrow-tiles.md)
    wide = N >= WIDE
    if kind == "int8":
        if wide and 16 < M <= 32:
            return Tiles(block_n=64, block_k=128 if swiglu else 256, waves=1, stages=4 if swiglu else 3, digits=True)
        if wide:
            return Tiles(block_n=64, block_k=128, waves=1, stages=4, f16=True) if swiglu else Tiles(
                block_k=256, stages=3, f16=True)
        return Tiles(block_k=128, waves=3)
    if kind == "int4":  # one row: 4 whole rows a program, 1024 channels a step (fastest over the 4 layers, H100,
        # bench/results/h100-80gb-hbm3/int4-gemv.md).
        # More rows: wide layers with x's channels in the weight's order (Tiles.xperm), whose products stay in
        # flight (H100, 8K n = 32, whole steps: 5.47 -> 5.34 ms; 128 channels a program for the narrow ones:
        # 5.62, slower; bench/results/h100-80gb-hbm3/int4-m32.md)
        if M <= GEMV_ROWS:
            return Tiles(block_n=4, block_k=1024, stages=1, gemv=True)
        return Tiles(block_n=64, block_k=128, stages=4, xperm=True) if wide else Tiles(
            block_n=64, block_k=128, stages=3)
    block_m = max(16, triton.next_power_of_2(M)) if row_tiles else 16  # linear_plan's
    if block_m >= 32 and wide:
        if triton.cdiv(N, 128) >= n_sm:
            return Tiles(block_n=128, block_k=64, waves=1, stages=4, warps=8)
        return Tiles(block_n=64, block_k=128, waves=1, stages=3)
    # narrow layers of more 32-channel programs than SMs (Mistral-7B's wqkv, N = 6144: 192) at 17 to 32 rows,
    # 16-row tiles: 64 channels a program, one wave (H100, 32 rows: 24.0 -> 20.6 us, linear-mistral.md)
    if block_m >= 64 or (not row_tiles and not wide and 16 < M <= 32 and triton.cdiv(N, 32) > n_sm):
        return Tiles(block_n=64, block_k=128, splits=1, stages=4)
    # Llama-2-7B's w2 (N = 4096, K = 11008) at 17 to 32 rows, 16-row tiles: 64 channels a program, K in 2 splits
    # (whole steps, H100, n = 32: 8K 7.33 -> 7.27 ms; with wo too, 32K 11.54 -> 11.43; wo alone gained nothing,
    # Mistral-7B's wo or w2 (K = 14336) lost: narrow-tiles.md)
    if not row_tiles and not wide and 16 < M <= 32 and N < K <= 3 * N:
        return Tiles(block_n=64, block_k=128, splits=2, stages=4)
    return Tiles(block_n=64, block_k=128, waves=1, stages=5) if wide else Tiles(block_k=128, splits=1, stages=8)


def linear_plan(M: int, N: int, K: int, block_k: int, n_sm: int, tiles: Tiles) -> tuple[int, int, int]:
    """Rows per program, and how many splits of K give every SM `waves` programs to stream.
    Returns (BLOCK_M, P, chunk): P splits of chunk input channels each (whole K blocks)."""
    block_m = max(16, triton.next_power_of_2(M))  # the dot needs 16 at least
    col_blocks = triton.cdiv(N, tiles.block_n)
    splits = tiles.splits or triton.cdiv(tiles.waves * n_sm, col_blocks)
    splits = max(1, min(splits, triton.cdiv(K, block_k)))
    chunk = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    return block_m, triton.cdiv(K, chunk), chunk


def run_linear(x: Tensor, weight: Tensor, scales: Optional[Tensor], tiles: Optional[Tiles] = None,
               group: int = 0, swiglu: bool = False, residual: Optional[Tensor] = None,
               pairs: bool = False, rope: Optional[tuple[Tensor, Tensor, Tensor, Tensor, int]] = None) -> Tensor:
    # x (M, K); weight (N, K) bf16 or int8 with scales (N,) or None; or with group > 0, int4:
    # weight (N, K/2) uint8 and scales the scales and zero points (K/group, N, 2).
    # swiglu: weight is [gate; up] and y = silu(x gate^T) * (x up^T), (M, N / 2)
    # residual (M, N): y = residual + x W^T
    # pairs (int4 with swiglu, where the one-row kernel runs): y as the next one-row int4 layer's x, its fp16
    # pairs (gemv_input's, int16 (1, N / 2)); x int16 (1, K): such pairs
    # rope (freqs, k_dec, v_dec, slot, start), a decode step's qkv layer (weight [q; k; v] heads): freqs (1 or M, D)
    # the cos, sin of each pair of each row's position, k_dec, v_dec (M, Hkv, T, D); RoPE on q and k, k and v
    # stored in slot slot[0] - start; y is q, (M, N - 2 Hkv D). Where rope_operands says the kernel takes it
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] * (2 if group else 1) != K:
        raise ValueError(f"x has {K} input channels, the weight {weight.shape[1] * (2 if group else 1)}")
    if K % 16:  # keeps a K mask constant over 16 channels, so that loads stay vectorized
        raise ValueError(f"linear_triton needs K a multiple of 16, got {K}")
    if swiglu and N % 2:
        raise ValueError(f"swiglu needs the gate and up rows stacked, an even N, got {N}")
    if swiglu and residual is not None:
        raise ValueError("swiglu and residual do not go together")
    if M > MAX_M and rope is None:  # prefill, compiled (an eager prefill calls dense_linear itself: forward_linear)
        return dense_linear(x, weight, scales, group, swiglu, residual, eager=False)
    kind, n_sm = weight_kind(scales, group), sm_count(x.device)
    tiles = tiles or default_tiles(kind, N, M, n_sm, row_tiles_on(x.device), swiglu, K)
    x, dtype, x_scale = x.contiguous(), x.dtype, 1.0
    f16 = tiles.f16 and kind == "int8" and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    if f16 and x.dtype == torch.bfloat16:  # under torch.compile the conversion joins the kernel that makes x
        x, x_scale = (x * 2.0 ** -X_SHIFT).to(torch.float16), 2.0 ** X_SHIFT
    digits = tiles.digits and kind == "int8" and not f16
    x_lo = row_scale = None
    if digits:  # as f16's conversion, Inductor joins this to the kernel that makes x
        x, x_lo, row_scale = int8_digits(x)
    magic, bias = MAGIC.get(x.dtype, (0, 0.0))  # int4's nibbles to floats (x in digits: int8, unused)
    if group and scales.storage_offset() % 2:  # the kernel reads each (scale, zero) pair as one 32-bit word
        scales = scales.clone()
    if tiles.gemv and group and M == 1 and group % 8 == 0 and rope is None:
        return run_gemv(x, weight, scales, tiles, group, swiglu, residual, pairs)
    if x.dtype == torch.int16:
        raise ValueError("x's fp16 pairs (int16) go to the one-row int4 kernel only (Tiles.gemv, M = 1)")
    block_k = k_tile(tiles, weight, group)
    if swiglu:  # the activation needs the whole sum over K: one split
        tiles = dataclasses.replace(tiles, splits=1)
    block_m, P, chunk = linear_plan(M, N, K, block_k, n_sm, tiles)
    freqs, k_dec, v_dec, slot, start = rope or (weight, weight, weight, weight, 0)  # unused unless rope
    D, kvn = (k_dec.size(-1), k_dec.size(1) * k_dec.size(-1)) if rope else (0, 0)  # head dim, k's channels
    if rope is not None and (M > MAX_M or P > 1 or swiglu or residual is not None or D % tiles.block_n
                             or k_dec.stride(2) != D or freqs.size(-1) != D):
        raise ValueError(f"RoPE in the qkv kernel's epilogue needs one split and tiles within a head: {tiles}")
    # the residual add: in the kernel's epilogue with one split, else where the splits are summed
    residual, late = (None, residual) if P > 1 else (residual, None)
    # one split: y itself, in x's dtype; else fp32 partials (P, M, N), summed below
    shape = (M, N // 2) if swiglu else (M, N - 2 * kvn) if rope else (M, N) if P == 1 else (P, M, N)
    part = torch.empty(shape, device=x.device, dtype=dtype if P == 1 else torch.float32)
    residual = None if residual is None else residual.contiguous()
    deq = group and x.dtype == scales.dtype == torch.bfloat16 and x.is_cuda and block_k >= 64
    # the TMA's tiles of W (N, K): (BLOCK_N, BLOCK_K); for swiglu of (2, N / 2, K): a tile's gate rows, then its up rows
    tma = {"W": ((2, N // 2, K), (2, tiles.block_n // 2, block_k)) if swiglu else (None, (tiles.block_n, block_k))
           } if tiles.tma and not group else None
    if deq and tiles.xperm:  # x's channels 4c + r of each K tile to r block_k / 4 + c (Inductor joins this to
        # the op that makes x)
        x = x.view(M, K // block_k, block_k // 4, 4).transpose(-1, -2).reshape(M, K)
    tma_ops.run(
        _linear_kernel, (triton.cdiv(N, tiles.block_n), P),
        x, weight, weight if scales is None else scales, part, x if residual is None else residual,
        weight if x_lo is None else x_lo, weight if row_scale is None else row_scale, freqs, k_dec, v_dec, slot,
        M, N, K, chunk, *((start, k_dec.stride(0), k_dec.stride(1)) if rope else (0,) * 3),
        # S unused unless SCALED, Res unless RESIDUAL, XL and XS unless DIGITS, Fr .. DST_HEAD unless ROPE
        SCALED=scales is not None, BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=block_k, GROUP=group,
        EVEN_K=K % block_k == 0, SWIGLU=swiglu, RESIDUAL=residual is not None,
        MAGIC=magic, BIAS=bias, DIGITS=digits,
        DEQ=_DEQUANT_INT4 if deq else None, I8F16=_I8_TO_F16 if f16 else None, X_SCALE=x_scale,
        XPERM=bool(deq and tiles.xperm), TILES=chunk // block_k if deq and tiles.xperm and K % chunk == 0 else 0,
        ROPE=D, QN=N - 2 * kvn if rope else 0, KVN=kvn,
        ROPE_ROWS=bool(rope) and freqs.size(0) > 1,
        num_warps=tiles.warps, num_stages=tiles.stages, tma=tma,
        writes=("Out", "KD", "VD") if rope else ("Out",))
    if P == 1:
        return part  # (M, N)
    return (part.sum(0) if late is None else late.float() + part.sum(0)).to(dtype)  # (M, N), rounded once


def weight_kind(scales: Optional[Tensor], group: int) -> str:
    return "int4" if group else "int8" if scales is not None else "bf16"


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def k_tile(tiles: Tiles, weight: Tensor, group: int) -> int:  # run_linear's input channels a step
    return min(group, tiles.block_k or 128) if group else tiles.block_k or 256 // weight.element_size()


def rope_operands(layer: nn.Module, x: Tensor, head_dim: int) -> Optional[tuple[Tensor, Optional[Tensor], int]]:
    """The weight, scales and group with which a qkv layer (TritonLinear, quantize.py's) runs x's rows (x (..., K))
    through _linear_kernel in one split of K on tiles within a head, so that the kernel's epilogue can take RoPE
    and the store of k and v (run_linear's rope, qkv_rope); else None: cuBLAS above MAX_M rows, PyTorch's int4
    kernel or the one-row one, splits of K (int4's tiles at every row count)."""
    M, K = x.numel() // x.shape[-1], x.shape[-1]
    operands = getattr(layer, "kernel_operands", None)  # TritonLinear's, quantize.Int8Linear's
    if operands is None:
        return None
    weight, scales, group = ops = operands()
    kind = weight_kind(scales, group)
    if kind not in ROPE_KINDS or not x.is_cuda or M > MAX_M or x.dtype not in (torch.bfloat16, torch.float16) or K % 16:
        return None
    n_sm = sm_count(x.device)
    tiles = default_tiles(kind, weight.shape[0], M, n_sm, row_tiles_on(x.device), False, K)
    one_split = linear_plan(M, weight.shape[0], K, k_tile(tiles, weight, group), n_sm, tiles)[1] == 1
    return ops if one_split and not tiles.gemv and head_dim % tiles.block_n == 0 else None


def run_gemv(x: Tensor, weight: Tensor, scales: Tensor, tiles: Tiles, group: int, swiglu: bool,
             residual: Optional[Tensor], pairs: bool = False) -> Tensor:
    # run_linear's int4 at one row on the CUDA cores (_gemv_int4_kernel): tiles.block_n whole rows a program
    # (with swiglu, block_n / 2 gate rows and their up rows), tiles.block_k input channels of each a step
    # (whole groups, a power of 2 of them; None: 4096), no splits of K: the activation or the residual add in
    # the epilogue. x int16: its pairs already (run_linear's pairs)
    N, K = weight.shape[0], x.shape[1]
    # compiled: Inductor's kernel, which may fuse the op that makes x (int4-gemv.md)
    xp = x if x.dtype == torch.int16 else gemv_input(x)
    dtype = (residual if residual is not None else scales).dtype if x.dtype == torch.int16 else x.dtype
    pairs = pairs and swiglu and dtype in (torch.bfloat16, torch.float32) and N % 16 == 0
    per_step = max(1, (tiles.block_k or 4096) // group)  # whole groups, a power of 2 of them
    block_g = min(triton.next_power_of_2(K // group), 1 << (per_step.bit_length() - 1))
    out = torch.empty(1, N // 2 if swiglu else N, device=x.device, dtype=torch.int16 if pairs else dtype)
    torch.library.wrap_triton(_gemv_int4_kernel)[(triton.cdiv(N, tiles.block_n),)](
        # Res unless RESIDUAL: a tensor the kernel only reads (out there would alias Out, and Inductor would copy it)
        xp, weight, scales, out, scales if residual is None else residual.contiguous(), N, K // group, KW=K // 8,
        BLOCK_N=tiles.block_n, BLOCK_G=block_g, GROUP=group, SWIGLU=swiglu, RESIDUAL=residual is not None,
        EVEN_N=N % tiles.block_n == 0, EVEN_G=(K // group) % block_g == 0, X_SCALE=2.0 ** GEMV_SHIFT,
        WORD=_WORD if x.is_cuda else None, PAIRS=pairs, ROUND_BF16=dtype == torch.bfloat16,
        num_warps=tiles.warps, num_stages=tiles.stages)
    return out


# int8 with x in digits (Tiles.digits): each row of x as q row_scale, q an integer of at most DIGITS_MAX, the
# row's largest |x| (16-bit fixed point: each value within row_scale / 2 = max|x| 2^-16 of x, and the rounding of
# the fp32 quotient x / row_scale), and q = 256 hi + lo with hi, lo in [-127, 127]. The kernel multiplies the
# int8 weight by hi and by lo on the tensor cores, exactly: no conversion of the weight at all
DIGITS_MAX = 127 * 256 + 127


def int8_digits(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x (M, K) -> its digits hi, lo (M, K) int8 and row scales (M,) fp32 (two outputs, not one of both: a
    concatenation would keep Inductor from writing them in the kernel that makes x)."""
    xf = x.float()
    row_scale = xf.abs().amax(1, keepdim=True).clamp_min(1e-30) / DIGITS_MAX  # (M, 1)
    q = torch.round(xf / row_scale)
    hi = torch.floor((q + 128) / 256)
    return hi.to(torch.int8), (q - 256 * hi).to(torch.int8), row_scale.view(-1)


def gemv_input(x: Tensor) -> Tensor:
    """x (1, K) -> (1, K) int16 for _gemv_int4_kernel: x scaled by 2^-GEMV_SHIFT in fp16, its channels in the
    kernel's order: read as (4, K / 8) int32, [t, c] is the fp16 pair of channels 8c + (t ^ 1) (low half) and
    8c + 4 + (t ^ 1) (high half), those of nibbles t and t + 4 of word c. One pointwise op of x's size, which
    Inductor can fuse with the op that makes x. (Pairs of adjacent channels would let Inductor join a norm's
    reduction to it too, but cost the kernel a PRMT each, more than that saves: int4-gemv.md,
    int4-gemv-adjacent.patch.)"""
    h = (x.float() * 2.0 ** -GEMV_SHIFT).to(torch.float16).view(torch.int16)  # (1, K): [8c + 4a + 2b + e]
    return h.view(-1, 2, 2, 2).flip(-1).permute(2, 3, 0, 1).reshape(1, -1)  # [b, 1 - e, c, a]: t = 2b + 1 - e


def dense_linear(x: Tensor, weight: Tensor, scales: Optional[Tensor], group: int, swiglu: bool,
                 residual: Optional[Tensor], eager: bool) -> Tensor:
    # above MAX_M rows (prefill) the product is compute-bound: the weight in x's dtype, then cuBLAS.
    # eager: called outside the op (forward_linear), so its Triton kernels launch as they are
    # (wrap_triton, which an op needs, launches through the tracer's machinery outside one: slow),
    # and the activation is one kernel (in compiled code Inductor fuses PyTorch's)
    if group:
        weight = dequantize_int4(weight, scales, group, x.dtype, eager)
    elif scales is not None:
        weight = dequantize_int8(weight, scales, x.dtype, eager)
    if residual is not None:  # the add in cuBLAS's epilogue, rounded once
        return torch.addmm(residual, x, weight.t())
    y = F.linear(x, weight.to(x.dtype))  # (M, N)
    if swiglu:
        return swiglu_rows(y) if eager and y.is_cuda else swiglu_activation(y)
    return y


def dequantize_int8(weight: Tensor, scales: Tensor, dtype: torch.dtype, eager: bool = False) -> Tensor:
    """int8 (N, K) and its scales (N,) -> (N, K) in dtype, w = q scale, in one pass (PyTorch's int8 -> bf16
    copy alone read and wrote at about 1.1 TB/s: profile-prefill.md). eager: as dequantize_int4's."""
    N, K = weight.shape
    out = torch.empty(N, K, device=weight.device, dtype=dtype)
    block_n, block_k = 16, 256
    kernel = _dequant_int8_kernel if eager else torch.library.wrap_triton(_dequant_int8_kernel)
    kernel[(triton.cdiv(N, block_n), triton.cdiv(K, block_k))](weight, scales, out, N, K, BLOCK_N=block_n,
                                                               BLOCK_K=block_k, num_warps=4)
    return out


def dequantize_int4(weight: Tensor, scales_and_zeros: Tensor, group: int, dtype: torch.dtype,
                    eager: bool = False) -> Tensor:
    """int4 (N, K/2) uint8 and (K/group, N, 2) -> (N, K) in dtype: quantize.dequantize_int4 in one pass.
    eager: launched as it is (outside an op; dense_linear)."""
    N, K = weight.shape[0], weight.shape[1] * 2
    out = torch.empty(N, K, device=weight.device, dtype=dtype)
    block_n = 32
    kernel = _dequant_int4_kernel if eager else torch.library.wrap_triton(_dequant_int4_kernel)
    kernel[(triton.cdiv(N, block_n), K // group)](weight, scales_and_zeros, out, N, K, GROUP=group, BLOCK_N=block_n,
                                                  num_warps=4)
    return out


@torch.library.triton_op("linear_triton::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, scales: Optional[Tensor] = None, group: int = 0, swiglu: bool = False,
           residual: Optional[Tensor] = None, pairs: bool = False) -> Tensor:
    # x (..., K); weight (N, K) bf16, or int8 with scales (N,), or with group > 0 int4 (N, K/2) with
    # scales and zero points (K/group, N, 2); y in x's dtype: (..., N), or with swiglu (..., N / 2).
    # residual (..., N): added to y. pairs: run_linear's
    y = run_linear(x.reshape(-1, x.shape[-1]), weight, scales, group=group, swiglu=swiglu,
                   residual=None if residual is None else residual.reshape(-1, residual.shape[-1]), pairs=pairs)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@torch.library.triton_op("linear_triton::qkv_rope", mutates_args={"k_dec", "v_dec"})
def qkv_rope(x: Tensor, weight: Tensor, scales: Optional[Tensor], group: int, freqs_cis: Tensor, k_dec: Tensor,
             v_dec: Tensor, slot: Tensor, start: int) -> Tensor:
    """A decode step's qkv layer (the operands rope_operands gives) on x (B, 1, K), with RoPE and the store of k
    and v in its kernel's epilogue: q rotated, (B, H, 1, D), returned; k rotated and v stored in slot slot[0] -
    start of k_dec, v_dec (B, Hkv, T, D); freqs_cis ((1 or B), 1, D/2, 2). bifurcated.store_decode's work, without
    a launch of its own."""
    B, D = x.shape[0], k_dec.size(-1)
    q = run_linear(x.reshape(B, -1), weight, scales, group=group,
                   rope=(freqs_cis.reshape(-1, D), k_dec, v_dec, slot, start))
    return q.view(B, -1, 1, D)


def forward_linear(x: Tensor, weight: Tensor, scales: Optional[Tensor] = None, group: int = 0, swiglu: bool = False,
                   residual: Optional[Tensor] = None, pairs: bool = False) -> Tensor:
    """The layers' entry to `linear` (same arguments). An eager call with more than MAX_M rows (the
    prefill) goes to cuBLAS without the op: a 1K-token prefill is bound by the host's launches, and
    the op's dispatch is host time on each of them (profile-prefill.md)."""
    K = x.shape[-1]
    if x.numel() > MAX_M * K and not torch.compiler.is_compiling():
        y = dense_linear(x.reshape(-1, K), weight, scales, group, swiglu,
                         None if residual is None else residual.reshape(-1, residual.shape[-1]), eager=True)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return linear(x, weight, scales, group, swiglu, residual, pairs)


class TritonLinear(nn.Module):
    """A bf16 (or fp16) nn.Linear whose decode rows run the Triton kernel, which streams the weight at
    least as fast as cuBLAS (bench/results/h100-80gb-hbm3/linear.md, linear-narrow.md) and takes in the
    step's small neighbours: swiglu, the MLP's [gate; up] layer returning silu(gate) * up (model.FeedForward
    reads the flag); adds_residual, the residual stream comes in and goes out with the layer's output
    added in the kernel's epilogue (model.add_residual reads the flag). Same `weight` as the model's."""

    def __init__(self, weight: nn.Parameter, swiglu: bool = False, adds_residual: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight  # (N, K)
        self.swiglu, self.adds_residual = swiglu, adds_residual

    def kernel_operands(self) -> tuple[Tensor, None, int]:  # run_linear's weight, scales, group (rope_operands)
        return self.weight, None, 0

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return forward_linear(x, self.weight, swiglu=self.swiglu, residual=residual)


class TritonRMSNorm(RMSNorm):
    """model.RMSNorm, in one kernel where it runs eagerly (the prefill); compiled code keeps the plain
    form, which Inductor fuses with its neighbours."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or not x.is_cuda:
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps)


def use_kernels(model: Transformer):
    """On CUDA, swap the bf16/fp16 nn.Linear layers with at least NARROW outputs (after any tensor
    parallel sharding) for TritonLinear: the MLP's activation goes into w13, the residual adds into wo
    and w2 (unless tensor parallelism sums their outputs across ranks first); quantize.py's layers take
    the same flags. The RMSNorms become TritonRMSNorm."""
    def swap(parent: nn.Module, name: str, **flags):
        layer = getattr(parent, name)
        if (type(layer) is nn.Linear and layer.out_features >= NARROW and layer.weight.is_cuda
                and layer.weight.dtype in (torch.bfloat16, torch.float16) and not layer._forward_hooks):
            setattr(parent, name, TritonLinear(layer.weight, **flags))
        elif hasattr(layer, "swiglu") and layer.weight.is_cuda and not layer._forward_hooks:  # quantize.py's layers
            for flag, value in flags.items():
                setattr(layer, flag, value)

    def swap_norm(parent: nn.Module, name: str):
        norm = getattr(parent, name)
        if type(norm) is RMSNorm and norm.weight.is_cuda:
            fast = TritonRMSNorm(norm.weight.numel(), norm.eps)
            fast.weight = norm.weight
            setattr(parent, name, fast)

    for block in model.layers:
        swap_norm(block, "attention_norm")
        swap_norm(block, "ffn_norm")
        swap(block.attention, "wqkv")
        swap(block.attention, "wo", adds_residual=True)
        ff = block.feed_forward  # int4: w13's one-row kernel makes w2's x pairs (run_linear's pairs)
        int4 = all(hasattr(layer, "groupsize") for layer in (ff.w13, ff.w2))
        swap(ff, "w13", swiglu=True, **({"pairs_out": True} if int4 else {}))
        swap(block.feed_forward, "w2", adds_residual=True)
    swap(model, "output")
    swap_norm(model, "norm")
