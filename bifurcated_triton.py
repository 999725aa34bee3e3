# The fast bifurcated attention of one decode step, in Triton, registered as a custom op so that
# torch.compile and CUDA graphs capture it. Same math as bifurcated.bifurcated_attention (the
# plain-PyTorch reference), in two launches:
#   1. context: for KV head j, a tile of the n*g query rows that use it against a slice of the
#      shared context (a real matrix product on tensor cores). The context is split across thread
#      blocks (split-K) so that every SM streams a part of it; each returns its partial output,
#      normalized, in q's dtype, and its log-sum-exp in fp32. From 128 rows a block on a Hopper GPU,
#      cuDNN's attention takes this launch (cudnn_context), its products being faster there.
#   2. own + merge: for sample i and KV head j, its g query rows against its own filled decode
#      slots, then the exact LSE merge of that with the context's partials of those rows, in fp32
#      (for MHA, g = 1, a program per query row, on the CUDA cores).
# For MHA with many samples and a long context, the own slots run on a second stream beside launch 1,
# into one more partial, and a merge launch joins them (side_rows). More levels (a prefix shared by
# several prompts, then each prompt's own tokens) are more launches of the context kernel into the
# same buffers, before the last one. Where the context is
# split many ways (few samples) or a few samples have many decode slots, the samples' own slots go
# through the context kernel instead, split too, and a third launch merges (own_fused says which); for MHA
# with a few samples for each of the context's programs, those programs take them after their split
# (own_in_level). With few samples that launch also applies RoPE and stores the step's k and v
# (rope_decode_attention).
# Dimension letters: n samples, M context length, T decode capacity, H query heads, Hkv KV heads,
# g = H / Hkv, D head dim, R = n g query rows per KV head, P context splits.
import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

import tma as tma_ops

LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(q, K, V, keys, kmask, d, m_i, l_i, acc, QK_SCALE: tl.constexpr, D: tl.constexpr,
                  MASK: tl.constexpr = True):
    # one block of keys (rows `keys` of K, V (.., D), those in kmask; all of them without MASK) folded
    # into the online softmax of q's rows: running max m_i and sum l_i of the scores (log2 units),
    # unnormalized output acc
    if MASK:
        k = tl.load(K + keys[:, None] * D + d[None, :], mask=kmask[:, None], other=0.0)  # (BLOCK_N, D)
        v = tl.load(V + keys[:, None] * D + d[None, :], mask=kmask[:, None], other=0.0)  # (BLOCK_N, D)
    else:
        k = tl.load(K + keys[:, None] * D + d[None, :])
        v = tl.load(V + keys[:, None] * D + d[None, :])
    return _fold_block(q, k, v, kmask, m_i, l_i, acc, QK_SCALE, MASK)


@triton.jit
def _fold_block(q, k, v, kmask, m_i, l_i, acc, QK_SCALE: tl.constexpr, MASK: tl.constexpr):
    # _attend_block's keys k and values v (BLOCK_N, D), loaded
    if MASK:
        s = tl.where(kmask[None, :], tl.dot(q, tl.trans(k)), float("-inf"))  # (rows, BLOCK_N), unscaled
    else:
        s = tl.dot(q, tl.trans(k))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * QK_SCALE)
    if MASK:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet (a split past a prompt's end)
    else:
        m_use = m_new
    p = tl.math.exp2(s * QK_SCALE - m_use[:, None])  # the scale in the exponent's multiply-add
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _context_kernel(Q, K, V, O_part, L_part, Lens, R, G, M, R_ALL, SPLIT0, START, KT, VT, QK_SCALE: tl.constexpr,
                    HKV: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_N: tl.constexpr, LENGTHS: tl.constexpr, SLOT: tl.constexpr, TMA: tl.constexpr = False):
    _context_split(tl.program_id(0), tl.program_id(1), tl.program_id(2), Q, K, V, O_part, L_part, Lens, R, G, M,
                   R_ALL, SPLIT0, START, QK_SCALE, HKV, D, CHUNK, BLOCK_R, BLOCK_N, LENGTHS, SLOT,
                   KT=KT, VT=VT, TMA=TMA)


@triton.jit
def _context_own_kernel(Q, K, V, Lens, KD, VD, Slot, O_part, L_part, R, G, M, T, R_ALL, SPLIT0, SPLIT_OWN, START,
                        Freqs, F_ROW, ROW_Q, KN, VN, ROW_KV, KT, VT,
                        ROW_BLOCKS: tl.constexpr, P: tl.constexpr, GROUPS: tl.constexpr, P_OWN: tl.constexpr,
                        QK_SCALE: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK_R: tl.constexpr, CHUNK_OWN: tl.constexpr, BLOCK_G: tl.constexpr,
                        BLOCK_N: tl.constexpr, LENGTHS: tl.constexpr, ROPE: tl.constexpr,
                        OWN_IN_LEVEL: tl.constexpr = False, TMA: tl.constexpr = False):
    # one launch for the last level of keys (as _context_kernel, its programs first) and the samples'
    # own slots (as _context_kernel with SLOT, B groups of G rows): the small own programs fill the
    # last wave of the level's, and one launch less. With ROPE, q comes before RoPE (rows of stride ROW_Q)
    # and every program rotates its rows; the step's k and v (KN, VN, rows of stride ROW_KV) too, which the
    # own program holding the step's slot rotates and stores before it reads its slots (_context_split)
    pid = tl.program_id(0)
    n_level = ROW_BLOCKS * P * HKV * GROUPS
    if pid < n_level:
        _context_split(pid % ROW_BLOCKS, pid // ROW_BLOCKS % P, pid // (ROW_BLOCKS * P), Q, K, V, O_part, L_part,
                       Lens, R, G, M, R_ALL, SPLIT0, START, QK_SCALE, HKV, D, CHUNK, BLOCK_R, BLOCK_N, LENGTHS, False,
                       ROPE, Freqs, F_ROW, ROW_Q, KN, VN, ROW_KV, KT, VT, TMA)
        if OWN_IN_LEVEL:  # one level (GROUPS 1), no own programs: this program's share of KV head j's samples,
            j = pid // (ROW_BLOCKS * P)  # all of each one's own slots in one split (own_in_level)
            for c in range(pid % (ROW_BLOCKS * P), R_ALL // G, ROW_BLOCKS * P):
                _context_split(0, 0, c * HKV + j, Q, KD, VD, O_part, L_part, Slot, G, G, T, R_ALL, SPLIT_OWN,
                               START, QK_SCALE, HKV, D, CHUNK_OWN, BLOCK_G, BLOCK_N, False, True,
                               ROPE, Freqs, F_ROW, ROW_Q, KN, VN, ROW_KV)
    else:
        pid -= n_level  # split, then KV head and sample
        _context_split(0, pid % P_OWN, pid // P_OWN, Q, KD, VD, O_part, L_part, Slot, G, G, T, R_ALL, SPLIT_OWN,
                       START, QK_SCALE, HKV, D, CHUNK_OWN, BLOCK_G, BLOCK_N, False, True,
                       ROPE, Freqs, F_ROW, ROW_Q, KN, VN, ROW_KV)


@triton.jit
def _rope_rows(X, F, d, mask, D: tl.constexpr):
    # RoPE of rows X + d (.., D) at the rotations F + d (cos, sin of each (2i, 2i + 1) pair), in fp32, as
    # _rope_store_kernel: (.., D) fp32
    x0, x1 = tl.split(tl.reshape(tl.load(X + d, mask=mask, other=0.0).to(tl.float32), (X.shape[0], D // 2, 2)))
    cos, sin = tl.split(tl.reshape(tl.load(F + d, mask=mask, other=0.0).to(tl.float32), (X.shape[0], D // 2, 2)))
    return tl.reshape(tl.join(x0 * cos - x1 * sin, x1 * cos + x0 * sin), (X.shape[0], D))


@triton.jit
def _context_split(rb, split, jc, Q, K, V, O_part, L_part, Lens, R, G, M, R_ALL, SPLIT0, START,
                   QK_SCALE: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, LENGTHS: tl.constexpr, SLOT: tl.constexpr,
                   ROPE: tl.constexpr = False, Freqs=None, F_ROW=0, ROW_Q=0, KN=None, VN=None, ROW_KV=0,
                   KT=None, VT=None, TMA: tl.constexpr = False):
    # Row block rb of group c and KV head j (jc = c Hkv + j) against split `split` of its keys.
    # With LENGTHS, K holds one context per group of rows ((groups, Hkv, M, D), its rows those of
    # samples c R/G .. (c + 1) R/G - 1), group c filled up to Lens[c] (several prompts), or with
    # SLOT, every group up to slot Lens[0] - START (the samples' own decode slots, one group per sample).
    # Else K is one context (Hkv, M, D) for all rows. TMA: KT, VT are K, V as (.. M, D) descriptors of
    # (BLOCK_N, D) tiles, for the whole blocks of a level (not SLOT): the tensor memory accelerator copies them.
    j, c = jc % HKV, jc // HKV  # KV head, group
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # the group's query rows r = i g + h of KV head j
    rmask = rows < R
    d = tl.arange(0, D)
    # q (B, H, 1, D): row r is sample c (R / G) + r // G, query head j G + r % G
    sample = c * (R // G) + rows // G  # (BLOCK_R,)
    if ROPE:  # q before RoPE: sample s's heads at Q + s ROW_Q, rotated by Freqs + s F_ROW (F_ROW 0: one position)
        q = _rope_rows(Q + sample[:, None] * ROW_Q + (j * G + rows % G)[:, None] * D, Freqs + sample[:, None] * F_ROW,
                       d[None, :], rmask[:, None], D).to(Q.dtype.element_ty)  # (BLOCK_R, D)
    else:
        q_off = (sample * HKV + j) * G * D + (rows % G) * D  # (BLOCK_R,)
        q = tl.load(Q + q_off[:, None] + d[None, :], mask=rmask[:, None], other=0.0)  # (BLOCK_R, D)
    start = split * CHUNK
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    if SLOT:
        length = tl.load(Lens).to(tl.int32) - START + 1
    elif LENGTHS:
        length = tl.load(Lens + c).to(tl.int32)
    else:
        length = M
    stop = tl.minimum(CHUNK, length - start)  # the split's keys that are filled (none where it starts past them)
    kv = (c * HKV + j).to(tl.int64) * M * D
    if SLOT and ROPE:  # the step's slot, length - 1, in this split: its k rotated and v stored, then read back
        if (length - 1 >= start) & (length - 1 < start + CHUNK):
            dst = kv + (length - 1) * D + d[None, :]  # (1, D)
            src = c * ROW_KV + j * D + tl.zeros([1], tl.int32)[:, None]  # (1, 1)
            k_new = _rope_rows(KN + src, Freqs + c * F_ROW + tl.zeros([1], tl.int32)[:, None], d[None, :],
                               d[None, :] < D, D)
            tl.store(K + dst, k_new.to(K.dtype.element_ty))
            tl.store(V + dst, tl.load(VN + src + d[None, :]))
            tl.debug_barrier()  # the block's stores are seen by its loads below
    if SLOT:  # a sample's own slots: a few blocks, masked
        for n0 in range(0, stop, BLOCK_N):
            keys = start + n0 + tl.arange(0, BLOCK_N)
            m_i, l_i, acc = _attend_block(q, K + kv, V + kv, keys, keys < length, d, m_i, l_i, acc, QK_SCALE, D)
    else:  # whole blocks without masks, then the last, partial one (masks on every block cost more
        whole = stop // BLOCK_N * BLOCK_N  # where the context is not whole blocks: attention-large-n.md)
        for n0 in range(0, whole, BLOCK_N):
            if TMA:
                row = (c * HKV + j) * M + start + n0
                m_i, l_i, acc = _fold_block(q, KT.load([row, 0]), VT.load([row, 0]), None, m_i, l_i, acc, QK_SCALE,
                                            False)
            else:
                keys = start + n0 + tl.arange(0, BLOCK_N)
                m_i, l_i, acc = _attend_block(q, K + kv, V + kv, keys, None, d, m_i, l_i, acc, QK_SCALE, D, False)
        if whole < stop:
            keys = start + whole + tl.arange(0, BLOCK_N)
            m_i, l_i, acc = _attend_block(q, K + kv, V + kv, keys, keys < length, d, m_i, l_i, acc, QK_SCALE, D)
    # into (P, Hkv, R_ALL) from split SPLIT0 on; a split with no key: output 0, weight 0 in the merge
    part = ((SPLIT0 + split) * HKV + j) * R_ALL + c * R + rows  # (BLOCK_R,)
    seen = l_i > 0
    tl.store(O_part + part[:, None] * D + d[None, :],
             tl.where(seen[:, None], acc / l_i[:, None], 0.0).to(O_part.dtype.element_ty), mask=rmask[:, None])
    tl.store(L_part + part, tl.where(seen, m_i + tl.math.log2(l_i), float("-inf")), mask=rmask)


@triton.jit
def _own_merge_kernel(Q, K, V, O_part, L_part, Out, Slot, START, T, R_ALL, P: tl.constexpr, QK_SCALE: tl.constexpr,
                      HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    # sample c, KV head j: its G query rows against its own slots 0..Slot[0] - START of K, V (B, Hkv, T, D),
    # then folded with the P partials (P, Hkv, R_ALL) of those rows that the context launches wrote
    c, j = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, BLOCK_G)  # the query heads j G + r of sample c (padded to 16 rows for the dot)
    rmask = r < G
    d = tl.arange(0, D)
    q_off = ((c * HKV + j) * G + r) * D  # (BLOCK_G,) into q (B, H, 1, D)
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=rmask[:, None], other=0.0)  # (BLOCK_G, D)
    length = tl.load(Slot).to(tl.int32) - START + 1
    kv = (c * HKV + j).to(tl.int64) * T * D
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for n0 in range(0, length, BLOCK_N):  # filled slots only; slot 0 always is
        keys = n0 + tl.arange(0, BLOCK_N)
        kmask = keys < length
        m_i, l_i, acc = _attend_block(q, K + kv, V + kv, keys, kmask, d, m_i, l_i, acc, QK_SCALE, D)
    # each partial is a normalized output o_p with log2-sum-exp lse_p, i.e. the unnormalized sum
    # 2^lse_p o_p; a partial with no key has lse_p = -inf: weight 0
    part = j * R_ALL + c * G + r  # (BLOCK_G,) into (P, Hkv, R_ALL), split 0
    for _ in tl.static_range(P):  # unrolled: the loads of all partials go out at once
        lse = tl.load(L_part + part, mask=rmask, other=float("-inf"))  # (BLOCK_G,)
        o = tl.load(O_part + part[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        m_new = tl.maximum(m_i, lse)  # finite: the own part is
        alpha = tl.math.exp2(m_i - m_new)
        w = tl.math.exp2(lse - m_new)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m_i = m_new
        part += HKV * R_ALL
    tl.store(Out + q_off[:, None] + d[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _own_merge_row_kernel(Q, K, V, O_part, L_part, Out, Slot, START, T, R_ALL, P: tl.constexpr,
                          QK_SCALE: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                          BLOCK_N: tl.constexpr, MERGE: tl.constexpr = True):
    # _own_merge_kernel for one query row, sample c and query head h (of KV head h // G), the scores on
    # the CUDA cores; for MHA, where _own_merge_kernel's tl.dot pads the one row of each program to 16
    # and its registers let 2 programs share an SM, so that with few filled slots its short programs
    # wait on their latency. One warp a program: MHA n = 256, own + merge with 10 filled slots 59 -> 15 us,
    # with 64 101 -> 91 us, with 128 the same (attention-own-row.md); 32 keys a step rather than 16, n = 128
    # with 128 filled 149.8 -> 146.9 us (attention-own-in-level.md). Without MERGE, its normalized output
    # and log-sum-exp go to split P of the partials instead, beside the context launches (attend_levels)
    c, h = tl.program_id(0), tl.program_id(1)
    j = h // G
    d = tl.arange(0, D)
    q = tl.load(Q + (c * HKV * G + h) * D + d).to(tl.float32)  # (D,) of q (B, H, 1, D)
    length = tl.load(Slot).to(tl.int32) - START + 1
    kv = (c * HKV + j).to(tl.int64) * T * D
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for n0 in range(0, length, BLOCK_N):  # filled slots only; slot 0 always is
        keys = n0 + tl.arange(0, BLOCK_N)
        kmask = keys < length
        k = tl.load(K + kv + keys[:, None] * D + d[None, :], mask=kmask[:, None], other=0.0).to(tl.float32)
        v = tl.load(V + kv + keys[:, None] * D + d[None, :], mask=kmask[:, None], other=0.0).to(tl.float32)
        s = tl.where(kmask, tl.sum(q[None, :] * k, axis=1) * QK_SCALE, float("-inf"))  # (BLOCK_N,), log2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=0))  # finite: the first block holds slot 0
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)  # (D,)
        m_i = m_new
    part = j * R_ALL + c * G + h % G  # into (P, Hkv, R_ALL), split 0
    if MERGE:
        for _ in tl.static_range(P):  # as _own_merge_kernel's merge
            lse = tl.load(L_part + part)
            o = tl.load(O_part + part * D + d).to(tl.float32)  # (D,)
            m_new = tl.maximum(m_i, lse)
            alpha = tl.math.exp2(m_i - m_new)
            w = tl.math.exp2(lse - m_new)
            l_i = l_i * alpha + w
            acc = acc * alpha + w * o
            m_i = m_new
            part += HKV * R_ALL
        tl.store(Out + (c * HKV * G + h) * D + d, (acc / l_i).to(Out.dtype.element_ty))
    else:  # split P of the partials
        part += P * HKV * R_ALL
        tl.store(O_part + part * D + d, (acc / l_i).to(O_part.dtype.element_ty))
        tl.store(L_part + part, m_i + tl.math.log2(l_i))


@triton.jit
def _merge_kernel(O_part, L_part, Out, R, G, HKV: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    # each split is a normalized output o_s with log2-sum-exp lse_s, i.e. an unnormalized sum
    # 2^lse_s o_s; fold them all exactly, BLOCK_P at a time, in fp32
    i, h = tl.program_id(0), tl.program_id(1)  # sample i, query head h (of KV head h // G)
    j = h // G
    d = tl.arange(0, D)
    row = i * G + h % G  # this head's query row of KV head j
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, P, BLOCK_P):
        sp = s0 + tl.arange(0, BLOCK_P)
        pmask = sp < P
        part = (sp * HKV + j) * R + row  # (BLOCK_P,) into (P, Hkv, R)
        lse = tl.load(L_part + part, mask=pmask, other=float("-inf"))  # (BLOCK_P,)
        o = tl.load(O_part + part[:, None] * D + d[None, :], mask=pmask[:, None], other=0.0).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(lse, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet in the splits so far
        alpha = tl.math.exp2(m_i - m_use)
        w = tl.math.exp2(lse - m_use)  # (BLOCK_P,)
        l_i = l_i * alpha + tl.sum(w, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * o, axis=0)
        m_i = m_new
    tl.store(Out + (i * HKV * G + h) * D + d, (acc / l_i).to(Out.dtype.element_ty))  # slot 0 is always filled


@triton.jit
def _rope_store_kernel(Q, K, V, Freqs, Q_out, K_dst, V_dst, Slot, START, DST_ROW, DST_HEAD, ROW_Q, ROW_K, ROW_V,
                       F_ROW, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HEADS: tl.constexpr,
                       SLOT: tl.constexpr):
    # row b (a sample in a decode step, a token in a prefill), heads hb HEADS .. of [H query heads; HKV
    # key heads]: RoPE on the (2i, 2i + 1) pairs in fp32 (model.apply_rotary_emb), q out to (rows, H, D),
    # k to K_dst + b DST_ROW + head DST_HEAD (+ (Slot[0] - START) D with SLOT); and value heads hb HEADS ..
    # (those below HKV) copied to the same place of V_dst
    b, hb = tl.program_id(0), tl.program_id(1)
    h = hb * HEADS + tl.arange(0, HEADS)  # (HEADS,)
    d = tl.arange(0, D)
    is_q, is_k = h < H, (h >= H) & (h < H + HKV)
    x = (tl.load(Q + b * ROW_Q + h[:, None] * D + d[None, :], mask=is_q[:, None], other=0.0).to(tl.float32)
         + tl.load(K + b * ROW_K + (h - H)[:, None] * D + d[None, :], mask=is_k[:, None], other=0.0).to(tl.float32))
    x0, x1 = tl.split(tl.reshape(x, (HEADS, D // 2, 2)))  # (HEADS, D/2) each
    cos, sin = tl.split(tl.reshape(tl.load(Freqs + b * F_ROW + d), (D // 2, 2)))  # (D/2,) each
    y = tl.reshape(tl.join(x0 * cos[None, :] - x1 * sin[None, :], x1 * cos[None, :] + x0 * sin[None, :]), (HEADS, D))
    slot = 0
    if SLOT:  # else a prefill: row b's position is its own place, b DST_ROW
        slot = tl.load(Slot) - START
    tl.store(Q_out + (b * H + h[:, None]) * D + d[None, :], y.to(Q_out.dtype.element_ty), mask=is_q[:, None])
    dst = b.to(tl.int64) * DST_ROW + slot * D + d[None, :]  # (1, D)
    tl.store(K_dst + dst + (h[:, None] - H) * DST_HEAD, y.to(K_dst.dtype.element_ty), mask=is_k[:, None])
    is_v = h < HKV
    v = tl.load(V + b * ROW_V + h[:, None] * D + d[None, :], mask=is_v[:, None], other=0.0)
    tl.store(V_dst + dst + h[:, None] * DST_HEAD, v, mask=is_v[:, None])


@dataclass(frozen=True)
class Tiles:
    """Launch parameters of the context kernel: the defaults serve the op; scripts/bench_attention.py
    times others."""
    # query rows per block, at most (the dot needs at least 16); above 64 rows per KV head (GQA n >= 32,
    # MHA n >= 128) more row blocks and fewer, longer context splits stream faster (attention-rows64.md)
    max_rows: int = 64
    block_n: int = 64  # keys per inner step
    waves: int = 2  # thread blocks per SM that the context split aims for
    # from this many rows per KV head (MHA n >= 256, GQA n >= 64), where the context's products bound
    # the time, blocks of 128 rows in one wave instead (MHA n = 512: 164.3 -> 149.0 us a context launch,
    # attention-large-n.md)
    wide_rows: Optional[int] = 256
    stages: int = 3  # software-pipelining depth of the key/value loads
    warps: Optional[int] = None  # None: 8 for 128-row tiles, else 4
    # from 32 to 64 rows per KV head (MHA n = 32, 64; GQA n = 8, 16): one wave of longer splits, fewer
    # partials to write and merge, with 128 keys a step where a split has 2048 keys or more (one layer,
    # 8K, H200: MHA n = 32 52.9 -> 49.6 us, n = 64 68.0 -> 56.8; GQA n = 16 20.8 -> 17.8;
    # bench/results/h200/attention-mid-rows.md)
    mid_rows: Optional[tuple[int, int]] = (32, 64)
    # the 128-row blocks' launches by cuDNN's attention where it serves them (cudnn_context); on an H100
    # one layer's context at 8K, MHA n = 256: 78.1 -> 65.9 us, GQA n = 256: 74.4 -> 65.1 (lib-context.md)
    cudnn: bool = True
    tma: bool = False  # a level's whole blocks of keys and values copied by the tensor memory accelerator (TMA)


def rows_tiles(R: int, M: int, n_kv_heads: int, n_sm: int, tiles: Tiles) -> Tiles:
    """The tiles for R query rows per KV head and M keys: `tiles`, or in tiles.mid_rows one wave."""
    if tiles.mid_rows is None or not tiles.mid_rows[0] <= R <= tiles.mid_rows[1]:
        return tiles
    one_wave = dataclasses.replace(tiles, waves=1, mid_rows=None)
    chunk = context_plan(R, M, n_kv_heads, n_sm, one_wave)[2]
    return dataclasses.replace(one_wave, block_n=128) if chunk >= 2048 else one_wave


def context_level(R: int, k_ctx: Tensor, v_ctx: Tensor, n_sm: int, tiles: Tiles) -> tuple[Tiles, "Level"]:
    """One prompt's context, (Hkv, M, D), for R query rows per KV head: its tiles (rows_tiles) and level."""
    Hkv, M, _ = k_ctx.shape
    tiles = rows_tiles(R, M, Hkv, n_sm, tiles)
    return tiles, Level(k_ctx, v_ctx, None, context_plan(R, M, Hkv, n_sm, tiles))


def context_plan(R: int, M: int, n_kv_heads: int, n_sm: int, tiles: Tiles = Tiles()) -> tuple[int, int, int]:
    """Query rows per block, and how many context splits give every SM `waves` blocks to stream.
    Returns (BLOCK_R, P, chunk): P splits of chunk keys each (whole key blocks)."""
    wide = tiles.wide_rows is not None and R >= tiles.wide_rows
    max_rows, waves = (128, 1) if wide else (tiles.max_rows, tiles.waves)
    block_r = min(max_rows, max(16, triton.next_power_of_2(R)))
    row_blocks = triton.cdiv(R, block_r)
    # rounded down: a last, partial wave of blocks would take as long as a whole one
    splits = max(1, min(waves * n_sm // (n_kv_heads * row_blocks), triton.cdiv(M, tiles.block_n)))
    chunk = triton.cdiv(triton.cdiv(M, splits), tiles.block_n) * tiles.block_n
    return block_r, triton.cdiv(M, chunk), chunk


def run_decode_attention(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_dec: Tensor, v_dec: Tensor, slot: Tensor,
                         start: int = 0, tiles: Tiles = Tiles(), side: bool = False) -> Tensor:
    q = q.contiguous()  # a transposed (n, 1, H, D): free, since S = 1
    n, H, _, D = q.shape
    tiles, ctx = context_level(n * H // k_ctx.size(0), k_ctx, v_ctx, num_sms(q), tiles)
    return attend_levels(q, [ctx], k_dec, v_dec, slot, start, tiles, side)


# RoPE and the store of the step's k and v in the attention's launch where it has at most this many own
# programs (samples x KV heads): each rotates its rows, which costs more than the launch it saves when
# there are many (8K, A/B in one run: Llama-2-7B n = 1 6.71 -> 6.67 ms, n = 32 7.40 -> 7.47; Mistral-7B
# n = 1 5.99 -> 5.95, n = 32 6.58 -> 6.51; rope-in-attention.md)
ROPE_PROGRAMS = 256


def run_rope_decode_attention(q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor, k_ctx: Tensor, v_ctx: Tensor,
                              k_dec: Tensor, v_dec: Tensor, slot: Tensor, start: int = 0,
                              tiles: Tiles = Tiles()) -> Tensor:
    # rope_store, then run_decode_attention; where the own slots go through the split context kernel
    # (few samples: the launch plan of n <= 64 at long contexts) and are few (ROPE_PROGRAMS), in that
    # launch: one kernel less a step
    n, _, H, D = q.shape  # q (n, 1, H, D), k, v (n, 1, Hkv, D): views of the qkv product, before RoPE
    Hkv = k_ctx.size(0)
    tiles, ctx = context_level(n * H // Hkv, k_ctx, v_ctx, num_sms(q), tiles)
    qt = q.transpose(1, 2)  # (n, H, 1, D): row i at i q.stride(0), its heads D apart
    if (n * Hkv > ROPE_PROGRAMS or own_plan(qt, [ctx], k_dec, tiles) is None or qt.stride(1) != D or k.stride(2) != D
            or v.stride(0) != k.stride(0)):
        qt = run_rope_store(q, k, v, freqs_cis, k_dec, v_dec, slot, start)
        return attend_levels(qt, [ctx], k_dec, v_dec, slot, start, tiles)
    return attend_levels(qt, [ctx], k_dec, v_dec, slot, start, tiles, rope=(k.flatten(0, 1), v.flatten(0, 1), freqs_cis))


# softmax in base 2 (exp2 is the hardware's instruction); a constexpr, so it stays fp32 under Inductor
def qk_scale(D: int) -> float:
    return LOG2E / math.sqrt(D)


@dataclass
class Level:
    """One level of keys: k, v (Hkv, M, D) for all rows, or (groups, Hkv, M, D) with lens, group c
    filled up to lens[c]; and its context_plan."""
    k: Tensor
    v: Tensor
    lens: Optional[Tensor]
    plan: tuple[int, int, int]


def attend_levels(q: Tensor, levels: list[Level], k_dec: Tensor, v_dec: Tensor, slot: Tensor, start: int = 0,
                  tiles: Tiles = Tiles(), side: bool = False, rope: Optional[tuple[Tensor, ...]] = None) -> Tensor:
    """Each level's splits into one pair of buffers, then each sample's own decode slots 0..slot[0] - start
    and the exact merge of them all: (B, H, 1, D). side (MHA): the own slots on a second stream, beside
    the context launches, then a merge launch (side_rows). rope (k, v, freqs_cis, as rope_store's), where
    the own slots go through the split context kernel (own_plan): q, k, v come before RoPE and that launch
    rotates them and stores the step's k and v; q (B, H, 1, D) is then a view of the qkv product."""
    B, H, _, D = q.shape  # q (B, H, 1, D) contiguous; k_dec, v_dec (B, Hkv, T, D); slot (1,) or more
    _, Hkv, T, _ = k_dec.shape
    G = H // Hkv
    P = sum(lv.plan[1] for lv in levels)
    own = own_plan(q, levels, k_dec, tiles)
    if rope is not None and (own is None or len(levels) > 1):
        raise ValueError("attend_levels rotates q, k and v only with one level and the own slots split")
    side = side and own is None and G == 1
    if side:  # cuDNN's launch fills the SMs: the own slots' stream would wait (lib-context.md)
        tiles = dataclasses.replace(tiles, cudnn=False)
    in_level = own is not None and own_in_level(B, G, T, levels[-1])
    if in_level:  # one split of all T slots
        own = own[0], 1, triton.cdiv(T, tiles.block_n) * tiles.block_n
    o_part, l_part = new_partials(P + (own[1] if own else 0) + side, q, Hkv)
    split0 = 0
    out = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    if own is None:  # a program per sample and KV head: its own slots, then the merge
        stream = side_stream(q) if side else None  # None on a CPU (Triton's interpreter): one after the other
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        for lv in levels:
            launch_context(q, lv.k, lv.v, lv.lens, o_part, l_part, split0, lv.plan, tiles)
            split0 += lv.plan[1]
        if G == 1:  # MHA: a row per program
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                torch.library.wrap_triton(_own_merge_row_kernel)[(B, H)](
                    q, k_dec, v_dec, o_part, l_part, out, slot, start, T, B * G, P=P, QK_SCALE=qk_scale(D), HKV=Hkv,
                    G=G, D=D, BLOCK_N=SIDE_ROW_BLOCK_N if side else ROW_BLOCK_N, MERGE=not side, num_warps=1)
            if not side:
                return out
            if stream is not None:
                torch.cuda.current_stream().wait_stream(stream)
            return merge(o_part, l_part, out, P + 1, G)
        torch.library.wrap_triton(_own_merge_kernel)[(B, Hkv)](
            q, k_dec, v_dec, o_part, l_part, out, slot, start, T, B * G, P=P, QK_SCALE=qk_scale(D), HKV=Hkv, G=G, D=D,
            BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=tiles.block_n, num_warps=4, num_stages=2)
        return out
    # a context in many splits, or few samples with many slots: the own slots split over the SMs, in
    # one launch with the last level, then a merge launch
    for lv in levels[:-1]:
        launch_context(q, lv.k, lv.v, lv.lens, o_part, l_part, split0, lv.plan, tiles)
        split0 += lv.plan[1]
    last = levels[-1]
    groups = 1 if last.lens is None else last.k.size(0)
    (block_r, p, chunk), (block_g, p_own, chunk_own) = last.plan, own
    M = last.k.size(-2)
    n_level = triton.cdiv(B // groups * G, block_r) * p * Hkv * groups
    k_new, v_new, freqs = rope if rope is not None else (q, q, q)  # unused without ROPE
    f = freqs.reshape(-1, D)  # (1 or B, D): cos, sin of each pair
    tma_ops.run(
        _context_own_kernel, (n_level + (0 if in_level else p_own * Hkv * B),),
        q, last.k, last.v, l_part if last.lens is None else last.lens, k_dec, v_dec, slot, o_part, l_part,
        B // groups * G, G, M, T, B * G, split0, split0 + p, start,
        f, D if f.size(0) > 1 else 0, q.stride(0), k_new, v_new, k_new.stride(0), last.k, last.v,
        ROW_BLOCKS=triton.cdiv(B // groups * G, block_r),
        P=p, GROUPS=groups, P_OWN=p_own, QK_SCALE=qk_scale(D), HKV=Hkv, D=D, CHUNK=chunk, BLOCK_R=block_r,
        CHUNK_OWN=chunk_own, BLOCK_G=block_g, BLOCK_N=tiles.block_n, LENGTHS=last.lens is not None,
        ROPE=rope is not None, OWN_IN_LEVEL=in_level,
        num_warps=tiles.warps or (8 if block_r >= 128 else 4), num_stages=tiles.stages,
        tma=kv_tiles(D, tiles.block_n) if tiles.tma else None,
        writes=("O_part", "L_part") + (("KD", "VD") if rope is not None else ()))
    return merge(o_part, l_part, out, P + p_own, G)


# Keys a step of the own-row kernel (MHA, a program per sample and head), on one stream and on the second
# (side_rows). One stream: 16 -> 32 was 0-3 us faster a layer at 8K n = 8 and 16 (H100,
# attention-own-in-level.md). Beside the context launch, 16 keys a step (fewer registers: more of its
# warps fit beside the context's) at 8K n = 512, 10 / 64 / 128 slots filled: 188.7 -> 181.5, 283.5 ->
# 258.7, 447.9 -> 422.4 us a layer (H100, bench/results/h100-80gb-hbm3/row-block.md)
ROW_BLOCK_N, SIDE_ROW_BLOCK_N = 32, 16


# The samples' own slots in the programs of the last level's launch, for MHA where every program takes at
# least one sample and its share of them (all T slots of a few samples) is at most 1 / OWN_SHARE of its
# context keys: no own programs, which ran after the level's as a tail. On an H100 (bench_attention.py
# --own_share 0 vs 4, 64 slots filled), a layer at 8K n = 8 57.5 -> 54.6 us, n = 16 62.0 -> 59.0, at 32K
# n = 8 201.3 -> 185.7, n = 16 203 -> 191; slower for GQA (8K n = 8 20.0 -> 21.8), whose own programs
# are few and short, and for n = 1, one program's tail (attention-own-in-level.md)
OWN_SHARE = 4


def own_in_level(B: int, G: int, T: int, level: Level) -> bool:
    """Whether the programs of one prompt's context (level; B samples of G query rows per KV head) take the
    samples' own slots: a few samples each, all T slots of each in one split."""
    block_r, p, chunk = level.plan
    programs = triton.cdiv(B * G, block_r) * p  # per KV head
    samples = triton.cdiv(B, programs)  # per program
    return level.lens is None and G == 1 and B >= programs and OWN_SHARE * samples * T <= chunk


def own_plan(q: Tensor, levels: list[Level], k_dec: Tensor, tiles: Tiles = Tiles()) -> Optional[tuple[int, int, int]]:
    """None where a program per sample and KV head takes its own slots and the merge (own_fused), else
    the context_plan of the own slots, split like a context in the last level's launch."""
    B, H = q.shape[:2]
    _, Hkv, T, _ = k_dec.shape
    P, n_sm = sum(lv.plan[1] for lv in levels), num_sms(q)
    return None if own_fused(P, B, Hkv, T, n_sm) else context_plan(H // Hkv, T, Hkv * B, n_sm, tiles)


def merge(o_part: Tensor, l_part: Tensor, out: Tensor, P: int, G: int) -> Tensor:
    B, H, _, D = out.shape  # the P partials (P, Hkv, B G, D), (P, Hkv, B G) -> out (B, H, 1, D)
    torch.library.wrap_triton(_merge_kernel)[(B, H)](
        o_part, l_part, out, B * G, G, HKV=H // G, D=D, P=P, BLOCK_P=min(64, triton.next_power_of_2(P)), num_warps=4)
    return out


# MHA with at least SIDE_ROWS samples and a context of at least SIDE_CONTEXT keys: the samples' own slots,
# bound by the memory, run on a second stream beside the context launch, bound by its matrix products.
# One layer at n = 512, 8K, 64 of 128 slots filled: 341.8 -> 268.7 us; at n = 256 about even (177.8 ->
# 170.0 us, but 104.1 -> 113.3 with 10 filled); attention-large-n.md
SIDE_ROWS, SIDE_CONTEXT = 512, 8192
_side_streams: dict = {}


def side_rows(q: Tensor, k_ctx: Tensor) -> bool:
    return q.is_cuda and q.size(1) == k_ctx.size(0) and q.size(0) >= SIDE_ROWS and k_ctx.size(1) >= SIDE_CONTEXT


def side_stream(q: Tensor) -> Optional[torch.cuda.Stream]:
    if not q.is_cuda:
        return None
    if q.device not in _side_streams:
        _side_streams[q.device] = torch.cuda.Stream(q.device)
    return _side_streams[q.device]


def own_fused(P: int, B: int, Hkv: int, T: int, n_sm: int) -> bool:
    """Whether one program per sample and KV head takes its own slots (up to T) and merges its rows'
    P context partials: where P is small and there are enough programs or short loops. Else (many
    splits of a context: few samples; or long decodes of few samples) the own slots go through the
    split context kernel and a merge launch. From scripts/bench_attention.py on an H100 (attention-own.md):
    GQA n=256 (P=4) 137 -> 121 us; MHA n=32 (P=8) 73 -> 77 and GQA n=32 (P=32) 39 -> 79 us if fused."""
    return P <= 4 and (B * Hkv >= n_sm or T <= 512)


def context_partials(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, tiles: Tiles = Tiles()) -> tuple[Tensor, Tensor]:
    """Launch 1: each context split's normalized output and log2-sum-exp, (P, Hkv, R, D) and (P, Hkv, R)."""
    n, H, _, D = q.shape  # q (n, H, 1, D) contiguous; k_ctx, v_ctx (Hkv, M, D)
    Hkv = k_ctx.size(0)
    tiles, ctx = context_level(n * H // Hkv, k_ctx, v_ctx, num_sms(q), tiles)  # as run_decode_attention's
    o_part, l_part = new_partials(ctx.plan[1], q, Hkv)
    launch_context(q, k_ctx, v_ctx, None, o_part, l_part, 0, ctx.plan, tiles)
    return o_part, l_part


def prefix_levels(q: Tensor, k_pre: Tensor, v_pre: Tensor, k_prm: Tensor, v_prm: Tensor, prm_len: Tensor,
                  tiles: Tiles = Tiles()) -> list[Level]:
    """Several prompts (bifurcated.prefix_attention): the prefix's splits over all rows (none if it
    is empty), then each prompt's splits over its own rows."""
    B, H, _, D = q.shape  # q (B, H, 1, D) prompt-major; k_pre (Hkv, Mp, D); k_prm (P, Hkv, L, D)
    Np, Hkv, L, _ = k_prm.shape
    G, Mp, n_sm = H // Hkv, k_pre.size(1), num_sms(q)
    pre = [Level(k_pre, v_pre, None, context_plan(B * G, Mp, Hkv, n_sm, tiles))] if Mp else []
    # splits past a short prompt's end hold no key
    return pre + [Level(k_prm, v_prm, prm_len, context_plan(B // Np * G, L, Hkv * Np, n_sm, tiles))]


def num_sms(q: Tensor) -> int:
    return torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4


# The partial outputs, normalized, in q's dtype (the merges read them into fp32); their log-sum-exps in fp32.
# bf16 rather than fp32 halves the bytes written and merged: 8K, n = 32, H100, A/B in one run, Mistral-7B
# 6.497 -> 6.335 ms a step, Llama-2-7B n = 256 12.364 -> 12.296 (partials-bf16.md)
def new_partials(P: int, q: Tensor, Hkv: int) -> tuple[Tensor, Tensor]:
    B, H, _, D = q.shape
    R = B * H // Hkv
    return (torch.empty(P, Hkv, R, D, device=q.device, dtype=q.dtype),  # (P, Hkv, R, D)
            torch.empty(P, Hkv, R, device=q.device, dtype=torch.float32))  # (P, Hkv, R)


def launch_context(q: Tensor, k: Tensor, v: Tensor, lens: Optional[Tensor], o_part: Tensor, l_part: Tensor,
                   split0: int, plan: tuple[int, int, int], tiles: Tiles, up_to_slot: bool = False, start: int = 0):
    # k, v (Hkv, M, D) for all rows, or with lens (groups, Hkv, M, D), group c filled up to lens[c],
    # or with up_to_slot, every group up to slot lens[0] - start (lens: the slot)
    B, H, _, D = q.shape
    Hkv, M = k.shape[-3], k.shape[-2]
    groups, G = 1 if lens is None else k.size(0), H // Hkv
    block_r, P, chunk = plan
    if cudnn_context(q, k, lens, plan, tiles):
        return launch_cudnn(q, k, v, o_part, l_part, split0, P)
    tma_ops.run(
        _context_kernel, (triton.cdiv(B // groups * G, block_r), P, Hkv * groups),
        q, k, v, o_part, l_part, l_part if lens is None else lens, B // groups * G, G, M, B * G, split0, start, k, v,
        QK_SCALE=qk_scale(D), HKV=Hkv, D=D, CHUNK=chunk, BLOCK_R=block_r, BLOCK_N=tiles.block_n,
        LENGTHS=lens is not None and not up_to_slot, SLOT=up_to_slot,
        num_warps=tiles.warps or (8 if block_r >= 128 else 4), num_stages=tiles.stages,
        tma=kv_tiles(D, tiles.block_n) if tiles.tma and not up_to_slot else None, writes=("O_part", "L_part"))


def kv_tiles(D: int, block_n: int) -> dict:
    """The TMA's tiles of a level's keys and values (.., M, D), KT and VT: (block_n, D) of (.., D) (Tiles.tma)."""
    return {"KT": ((-1, D), (block_n, D)), "VT": ((-1, D), (block_n, D))}


def cudnn_context(q: Tensor, k: Tensor, lens: Optional[Tensor], plan: tuple[int, int, int], tiles: Tiles) -> bool:
    """Whether cuDNN's attention takes a context launch: blocks of 128 rows (Tiles.wide_rows), a whole
    context (no lengths) in P equal splits, bf16 or fp16 (cuDNN's attention has no fp32), on a Hopper GPU
    (where it was measured) with PyTorch's cuDNN attention on. There its products run faster than ours
    (lib-context.md); not beside the second stream."""
    block_r, P, _ = plan
    return (tiles.cudnn and block_r >= 128 and lens is None and k.size(-2) % P == 0 and q.is_cuda and q.is_contiguous()
            and q.dtype in (torch.bfloat16, torch.float16) and q.size(-1) in (64, 128)
            and torch.cuda.get_device_capability(q.device)[0] == 9
            and torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cudnn.is_available()
            and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"))


def launch_cudnn(q: Tensor, k: Tensor, v: Tensor, o_part: Tensor, l_part: Tensor, split0: int, P: int):
    """launch_context's P splits of the context (Hkv, M, D) by cuDNN's attention, a split a batch entry,
    the R rows of each KV head its query: its output and natural log-sum-exp into the partials."""
    B, H, _, D = q.shape
    Hkv, M, _ = k.shape
    R = B * H // Hkv
    qs = q.view(B, Hkv, H // Hkv, D).transpose(0, 1).reshape(1, Hkv, R, D)  # row r = i g + h
    qs = qs.expand(P, Hkv, R, D)  # (P, Hkv, R, D): the same rows for every split, a stride-0 view
    ks, vs = (t.view(Hkv, P, M // P, D).transpose(0, 1) for t in (k, v))  # (P, Hkv, M / P, D) views
    o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qs, ks, vs, None, True)[:2]  # (P, Hkv, R, D)
    o_part[split0:split0 + P].copy_(o)
    l_part[split0:split0 + P].copy_(lse.reshape(P, Hkv, R) * LOG2E)  # natural log -> log2


def decode_attention(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_dec: Tensor, v_dec: Tensor, slot: Tensor,
                     start: int = 0) -> Tensor:
    """The decode step's attention (bifurcated.bifurcated_attention), q (n, H, 1, D): the step's decode
    slot is slot[0] - start (the caches hand the position and the context length, so that no kernel
    computes the slot apart in every layer). The op is chosen by the shapes, so once at compile time."""
    op = decode_attention_side if side_rows(q, k_ctx) else decode_attention_op
    return op(q, k_ctx, v_ctx, k_dec, v_dec, slot, start)


# The traced op (Inductor sees its Triton kernels), and the same with the own slots on a second stream: an
# opaque op, as streams cannot be traced
@torch.library.triton_op("bifurcated::decode_attention", mutates_args=())
def decode_attention_op(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_dec: Tensor, v_dec: Tensor, slot: Tensor,
                        start: int = 0) -> Tensor:
    return run_decode_attention(q, k_ctx, v_ctx, k_dec, v_dec, slot, start)


@torch.library.custom_op("bifurcated::decode_attention_side", mutates_args=())
def decode_attention_side(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_dec: Tensor, v_dec: Tensor, slot: Tensor,
                          start: int = 0) -> Tensor:
    return run_decode_attention(q, k_ctx, v_ctx, k_dec, v_dec, slot, start, side=True)


@decode_attention_side.register_fake
def _(q: Tensor, *args) -> Tensor:
    return q.new_empty(q.shape)


def rope_decode_attention(q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor, k_ctx: Tensor, v_ctx: Tensor,
                          k_dec: Tensor, v_dec: Tensor, slot: Tensor, start: int = 0) -> Tensor:
    """A decode step's RoPE, the store of its k and v, and its attention (rope_store, then
    decode_attention), from q, k, v before RoPE (n, 1, H or Hkv, D). In one op, which saves a launch where
    the plan allows (run_rope_decode_attention); with the second stream, the two apart."""
    if side_rows(q.transpose(1, 2), k_ctx):
        q = rope_store(q, k, v, freqs_cis, k_dec, v_dec, slot, start)
        return decode_attention_side(q, k_ctx, v_ctx, k_dec, v_dec, slot, start)
    return rope_decode_attention_op(q, k, v, freqs_cis, k_ctx, v_ctx, k_dec, v_dec, slot, start)


@torch.library.triton_op("bifurcated::rope_decode_attention", mutates_args={"k_dec", "v_dec"})
def rope_decode_attention_op(q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor, k_ctx: Tensor, v_ctx: Tensor,
                             k_dec: Tensor, v_dec: Tensor, slot: Tensor, start: int = 0) -> Tensor:
    return run_rope_decode_attention(q, k, v, freqs_cis, k_ctx, v_ctx, k_dec, v_dec, slot, start)


@torch.library.triton_op("bifurcated::prefix_attention", mutates_args=())
def prefix_decode_attention(q: Tensor, k_pre: Tensor, v_pre: Tensor, k_prm: Tensor, v_prm: Tensor, prm_len: Tensor,
                            k_dec: Tensor, v_dec: Tensor, slot: Tensor, start: int = 0) -> Tensor:
    # several prompts (bifurcated.prefix_attention); the slot as decode_attention's. No second stream: with a
    # 4K prefix and 512-token prompts (16 x 32 samples) it was no faster (attention-large-n.md)
    q = q.contiguous()  # (B, H, 1, D)
    return attend_levels(q, prefix_levels(q, k_pre, v_pre, k_prm, v_prm, prm_len), k_dec, v_dec, slot, start)


@torch.library.triton_op("bifurcated::rope_store", mutates_args={"k_dec", "v_dec"})
def rope_store(q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor, k_dec: Tensor, v_dec: Tensor, slot: Tensor,
               start: int = 0) -> Tensor:
    """A decode step's q, k, v (B, 1, H or Hkv, D; views of the qkv product, before RoPE) and the
    rotation of their positions freqs_cis ((1 or B), 1, D/2, 2): q rotated, (B, H, 1, D), returned;
    k rotated and v stored in slot slot[0] - start of k_dec, v_dec (B, Hkv, T, D). One launch:
    bifurcated.store_decode in plain PyTorch."""
    return run_rope_store(q, k, v, freqs_cis, k_dec, v_dec, slot, start)


def run_rope_store(q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor, k_dec: Tensor, v_dec: Tensor, slot: Tensor,
                   start: int) -> Tensor:
    B, _, H, D = q.shape
    out = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    launch_rope_store(torch.library.wrap_triton(_rope_store_kernel), q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                      freqs_cis, out, k_dec, v_dec, slot, start, k_dec.stride(0), k_dec.stride(1))
    return out


def rope_store_context(q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor, k_ctx: Tensor, v_ctx: Tensor) -> Tensor:
    """A prefill's q, k, v (1, S, H or Hkv, D; views of the qkv product, before RoPE) and freqs_cis
    (S, D/2, 2): k rotated and v stored in positions 0..S-1 of k_ctx, v_ctx (Hkv, >= S, D); q rotated
    returned, (S, H, D). One launch for what takes a dozen eager kernels: bifurcated.store_context.
    Eager only, so no op around it, and the kernel launched as it is (wrap_triton, which an op needs,
    launches through the tracer's machinery outside one: slow)."""
    _, S, H, D = q.shape
    out = torch.empty(S, H, D, device=q.device, dtype=q.dtype)  # (S, H, D)
    launch_rope_store(_rope_store_kernel, q[0], k[0], v[0], freqs_cis, out, k_ctx, v_ctx, None, 0, k_ctx.stride(1),
                      k_ctx.stride(0))
    return out


def launch_rope_store(kernel, q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor, out: Tensor, k_dst: Tensor,
                      v_dst: Tensor, slot: Optional[Tensor], start: int, dst_row: int, dst_head: int):
    # q (rows, H, D), k, v (rows, Hkv, D), each row's heads contiguous; row b's head h of k and v to
    # k_dst + b dst_row + h dst_head + (slot[0] - start) D (v_dst with the same strides; slot None: 0).
    # kernel: _rope_store_kernel inside an op, wrapped by wrap_triton; as it is outside one
    rows, H, D = q.shape
    Hkv = k.size(1)
    f = freqs_cis.reshape(-1, D)  # (1 or rows, D): cos, sin of each pair
    heads = 8
    kernel[(rows, triton.cdiv(H + Hkv, heads))](
        q, k, v, f, out, k_dst, v_dst, out if slot is None else slot, start, dst_row, dst_head,  # Slot unused if None
        q.stride(0), k.stride(0), v.stride(0), D if f.size(0) > 1 else 0,
        H=H, HKV=Hkv, D=D, HEADS=heads, SLOT=slot is not None, num_warps=4)
