# Does the Hopper's tensor memory accelerator (TMA) stream the decode step's operands faster than the pointer
# loads of linear_triton and bifurcated_triton? Two small kernels, each in two forms that differ only in how
# the streamed operand is loaded (pointers, as the project's kernels, or a host-made TensorDescriptor), timed
# beside the project's own kernel on the same inputs:
#   linear: y^T = W x^T of Llama-2-7B's layers (bf16, int8 with its scale), split-K as linear_plan, fp32 partials;
#   context: one layer's decode attention over the shared context (context_partials' launch, MHA and GQA).
# Each variant is checked against the project's kernel before it is timed (CUDA-graph replays rotating over
# copies of the weights / caches, > 200 MB, so that nothing is served from L2).
#   python bench/results/h100-80gb-hbm3/tma-probe.py [--quick]
import argparse
import itertools
import os
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "scripts"))
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

import bifurcated_triton as bt
import linear_triton as lt


@triton.jit
def _lin_kernel(X, W, S, Out, M, N, K, CHUNK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                TMA_W: tl.constexpr, TMA_X: tl.constexpr, SCALED: tl.constexpr):
    nb, split = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    start = split * CHUNK
    n_tiles = tl.cdiv(tl.minimum(start + CHUNK, K) - start, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for i in range(0, n_tiles):
        k0 = start + i * BLOCK_K
        if TMA_X:
            x = X.load([0, k0])  # rows past M: zeros
        else:
            x = tl.load(X + rows[:, None] * K + k0 + kk[None, :], mask=(rows < M)[:, None], other=0.0)
        if TMA_W:
            w = W.load([nb * BLOCK_N, k0])
        else:
            w = tl.load(W + cols[:, None].to(tl.int64) * K + k0 + kk[None, :], eviction_policy="evict_first")
        acc = tl.dot(w.to(x.dtype), tl.trans(x), acc)
    acc = tl.trans(acc)
    if SCALED:
        acc *= tl.load(S + cols).to(tl.float32)[None, :]
    tl.store(Out + split * M * N + rows[:, None] * N + cols[None, :], acc, mask=(rows < M)[:, None])


def run_lin(x, w, s, block_n, block_k, splits, stages, warps, tma_w, tma_x):
    M, K = x.shape
    N = w.shape[0]
    block_m, P, chunk = lt.linear_plan(M, N, K, block_k, 132, lt.Tiles(block_n=block_n, splits=splits))
    part = torch.empty(P, M, N, device=x.device, dtype=torch.float32)
    W = TensorDescriptor.from_tensor(w, [block_n, block_k]) if tma_w else w
    X = TensorDescriptor.from_tensor(x, [block_m, block_k]) if tma_x else x
    _lin_kernel[(triton.cdiv(N, block_n), P)](X, W, w if s is None else s, part, M, N, K, chunk, BLOCK_M=block_m,
                                              BLOCK_N=block_n, BLOCK_K=block_k, TMA_W=tma_w, TMA_X=tma_x,
                                              SCALED=s is not None, num_warps=warps, num_stages=stages)
    return part.sum(0).to(x.dtype)


@triton.jit
def _ctx_kernel(Q, K, V, O_part, L_part, R, G, M, R_ALL, QK_SCALE: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    # _context_split's whole-block path (context a multiple of BLOCK_N): K, V (Hkv M, D) as pointers or descriptors
    rb, split, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    d = tl.arange(0, D)
    q_off = ((rows // G) * HKV + j) * G * D + (rows % G) * D
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=rmask[:, None], other=0.0)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    row0 = j * M + split * CHUNK
    for n0 in range(0, CHUNK, BLOCK_N):
        if TMA:
            k = K.load([row0 + n0, 0])
            v = V.load([row0 + n0, 0])
        else:
            keys = row0 + n0 + tl.arange(0, BLOCK_N)
            k = tl.load(K + keys[:, None].to(tl.int64) * D + d[None, :])
            v = tl.load(V + keys[:, None].to(tl.int64) * D + d[None, :])
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * QK_SCALE)
        p = tl.math.exp2(s * QK_SCALE - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    part = (split * HKV + j) * R_ALL + rows
    tl.store(O_part + part[:, None] * D + d[None, :], (acc / l_i[:, None]).to(O_part.dtype.element_ty),
             mask=rmask[:, None])
    tl.store(L_part + part, m_i + tl.math.log2(l_i), mask=rmask)


def run_ctx(q, k, v, tiles, tma, stages):
    n, H, _, D = q.shape
    Hkv, M = k.shape[0], k.shape[1]
    R = n * H // Hkv
    tiles, ctx = bt.context_level(R, k, v, bt.num_sms(q), tiles)  # the project's tiles for these rows
    block_r, P, chunk = ctx.plan
    assert M % chunk == 0 and chunk % tiles.block_n == 0, (M, ctx.plan)
    o_part, l_part = bt.new_partials(P, q, Hkv)
    K2, V2 = k.view(Hkv * M, D), v.view(Hkv * M, D)
    if tma:
        K2 = TensorDescriptor.from_tensor(K2, [tiles.block_n, D])
        V2 = TensorDescriptor.from_tensor(V2, [tiles.block_n, D])
    _ctx_kernel[(triton.cdiv(R, block_r), P, Hkv)](q, K2, V2, o_part, l_part, R, H // Hkv, M, R,
                                                   QK_SCALE=bt.qk_scale(D),
                                                   HKV=Hkv, D=D, CHUNK=chunk, BLOCK_R=block_r, BLOCK_N=tiles.block_n,
                                                   TMA=tma, num_warps=4, num_stages=stages)
    return o_part, l_part


def merged(o_part, l_part):  # the partials joined by their log2-sum-exps: (Hkv, R, D) fp32
    w = torch.softmax(l_part * 0.6931471805599453, dim=0)  # 2^l normalized over the splits
    return (w[..., None] * o_part.float()).sum(0)


def checked(label: str, err_of) -> bool:
    """Whether a variant runs and is right (err_of() at most 1e-2); else a table row (label's cells) says why."""
    try:
        err = err_of()
    except Exception as e:  # a tile that does not fit, or a descriptor Triton refuses
        print(f"| {label} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | |", flush=True)
        return False
    if err > 1e-2:
        print(f"| {label} | wrong: {err:.3g} | |", flush=True)
        return False
    return True


def linear_rows(bw, quick):
    shapes = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008)}
    print("\n| layer | M | weights | path | block_n, block_k, splits, stages, warps | us | % of read bandwidth |")
    print("|---|---|---|---|---|---|---|")
    out = []
    for (name, (N, K)), kind in itertools.product(shapes.items(), ("bf16", "int8")):
        copies = max(2, (200 << 20) // (N * K) + 1)
        if kind == "bf16":
            ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            ss = [None] * copies
        else:
            ws = [torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8) for _ in range(copies)]
            ss = [(torch.rand(N, device="cuda") * 1e-3).to(torch.bfloat16) for _ in range(copies)]
        nbytes = N * K * ws[0].element_size()
        for M in (1, 32) if quick else (1, 32, 64):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = lt.run_linear(x, ws[0], ss[0]).float()
            t = lt.default_tiles(kind, N, M, 132, lt.row_tiles_on(x.device), False, K)
            bk = lt.k_tile(t, ws[0], 0)
            sp = t.splits or 0
            cands = [("project", None)]
            for block_n, block_k, stages, warps in [(t.block_n, bk, t.stages, t.warps), (64, 128, 4, 4),
                                                    (64, 256, 3, 4), (128, 128, 3, 8)]:
                for tma_w, tma_x in ((False, False), (True, False), (True, True)):
                    cands.append(("tma w+x" if tma_x else "tma w" if tma_w else "pointers",
                                  (block_n, block_k, sp or None, stages, warps, tma_w, tma_x)))
            seen = set()
            for path, c in cands:
                if c is not None and c in seen:
                    continue
                seen.add(c)
                if c is None:
                    fn = lambda x, w, s: lt.run_linear(x, w, s)
                else:
                    bn, bk2, sp2, st, wp, tw, tx = c
                    if sp2 is None:  # as the project: splits from waves
                        sp2 = max(1, triton.cdiv(t.waves * 132, triton.cdiv(N, bn)))
                    fn = lambda x, w, s, a=(bn, bk2, sp2, st, wp, tw, tx): run_lin(x, w, s, *a)
                if not checked(f"{name} | {M} | {kind} | {path} | {c}",
                               lambda: ((fn(x, ws[0], ss[0]).float() - ref).norm() / ref.norm()).item()):
                    continue
                us = time_sets(fn, [(x, w, s) for w, s in zip(ws, ss)])
                pct = 100 * nbytes / (us * 1e-6) / bw
                out.append(dict(layer=name, M=M, kind=kind, path=path, tiles=c, us=us, pct=pct))
                print(f"| {name} | {M} | {kind} | {path} | {c if c else t} | {us:.1f} | {pct:.0f}% |", flush=True)
        ws = ss = None  # freed before the next layer's copies
    return out


def context_rows(bw, quick):
    print("\n| Hkv | n | path | plan (rows, splits, chunk, keys a step) | stages | us | % of read bandwidth |")
    print("|---|---|---|---|---|---|---|")
    out = []
    H, D, M = 32, 128, 8192
    for Hkv, n in [(32, 1), (32, 32), (32, 64), (8, 32)] if not quick else [(32, 32), (8, 32)]:
        nbytes = 2 * 2 * Hkv * M * D
        copies = max(2, -(-(200 << 20) // nbytes))
        rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
        sets = [(rnd(n, H, 1, D), rnd(Hkv, M, D), rnd(Hkv, M, D)) for _ in range(copies)]
        tiles = bt.Tiles()
        ref = merged(*bt.context_partials(*sets[0], tiles))
        used, lv = bt.context_level(n * H // Hkv, sets[0][1], sets[0][2], bt.num_sms(sets[0][0]), tiles)
        plan = (*lv.plan, used.block_n)
        cands = [("project", None, tiles.stages)] + [(p, tma, st) for st in (2, 3, 4)
                                                     for p, tma in (("pointers", False), ("tma", True))]
        for path, tma, st in cands:
            fn = (lambda q, k, v: bt.context_partials(q, k, v, tiles)) if tma is None else \
                (lambda q, k, v, a=(tma, st): run_ctx(q, k, v, tiles, *a))
            if not checked(f"{Hkv} | {n} | {path} | {plan} | {st}",
                           lambda: ((merged(*fn(*sets[0])) - ref).norm() / ref.norm()).item()):
                continue
            us = time_sets(fn, sets)
            pct = 100 * nbytes / (us * 1e-6) / bw
            out.append(dict(Hkv=Hkv, n=n, path=path, plan=plan, stages=st, us=us, pct=pct))
            print(f"| {Hkv} | {n} | {path} | {plan} | {st} | {us:.1f} | {pct:.0f}% |", flush=True)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer rows and shapes")
    p.add_argument("--only", choices=["linear", "context"])
    p.add_argument("--output")
    args = p.parse_args()
    from bench_attention import read_bandwidth
    from bench_attention import time_us as time_sets
    bw = read_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}: "
          f"read {bw / 1e9:.0f} GB/s", flush=True)
    rows = {}
    if args.only != "linear":
        rows["context"] = context_rows(bw, args.quick)
    if args.only != "context":
        rows["linear"] = linear_rows(bw, args.quick)
    if args.output:
        import json
        with open(args.output, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), read_gbps=bw / 1e9, rows=rows), f, indent=1)
