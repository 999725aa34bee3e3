# The Triton kernels on a CPU, through Triton's interpreter (TRITON_INTERPRET=1, which must be set before
# Triton compiles anything: so in a child process), against the plain-PyTorch references. Attention
# (bifurcated_triton.py): the split context (whole key blocks and a masked last one), the samples' own
# slots in all three launch plans (with the merge; in own programs of the context's launch; in the context's
# programs), the 128-row blocks of many rows, several prompts' levels, and the own slots
# kept apart for a merge launch (`side`: on a GPU a second stream; here the same launches one after the
# other). Linear layers (linear_triton.py): bf16-style, int8 and int4 weights, splits of K, the SwiGLU and
# residual epilogues. In fp32: with bf16 inputs Triton 3.6's interpreter returned results off by orders of
# magnitude from kernels that the GPU tests pass in bf16 (test_gpu.py, which runs them at the real sizes).
# Small shapes only: the interpreter runs each program in numpy. And the linear kernels compiled for an H100 (sm_90)
# by Triton's compiler and ptxas, which the interpreter skips (a kernel it runs may still not compile).
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

ATTENTION = """
import torch
import bifurcated_triton as bt
from bifurcated import bifurcated_attention, prefix_attention, store_decode
from model import precompute_freqs_cis

def rel(out, ref):
    return ((out - ref).norm() / ref.norm()).item()

torch.manual_seed(0)
worst = 0.0
for fused, in_level in ((True, False), (False, False), (False, True)):
    bt.own_fused = lambda *a, f=fused: f  # the own slots in the last launch, or split with the context's,
    # in programs of their own or in the context's (one prompt's level only)
    bt.own_in_level = lambda B, G, T, level, f=in_level: f and level.lens is None
    # n, H, Hkv, context (not whole blocks of 64 or 32), head dim, decode slots, filled; wide_rows 16: 128-row blocks
    for n, H, Hkv, M, D, T, filled in [(4, 4, 2, 100, 16, 8, 3), (8, 4, 1, 130, 32, 20, 17), (3, 2, 2, 64, 16, 4, 4)]:
        q, kc, vc = torch.randn(n, H, 1, D), torch.randn(Hkv, M, D), torch.randn(Hkv, M, D)
        kd, vd, slot = torch.randn(n, Hkv, T, D), torch.randn(n, Hkv, T, D), torch.tensor([filled - 1])
        ref = bifurcated_attention(q, kc, vc, kd, vd, slot)
        # tma: the context's whole blocks through tensor descriptors
        for tiles in (bt.Tiles(), bt.Tiles(block_n=32), bt.Tiles(wide_rows=16), bt.Tiles(block_n=32, tma=True)):
            worst = max(worst, rel(bt.run_decode_attention(q, kc, vc, kd, vd, slot, tiles=tiles), ref))
            worst = max(worst, rel(bt.run_decode_attention(q, kc, vc, kd, vd, slot, tiles=tiles, side=True), ref))
        # RoPE and the store of the step's k and v in the attention's launch (where the own slots are split),
        # from q, k, v before RoPE, views of one qkv product; positions the same or one per sample
        for per_row in (False, True):
            qkv = torch.randn(n, 1, (H + 2 * Hkv) * D)
            qr, kr, vr = (t.view(n, 1, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
            freqs = precompute_freqs_cis(256, D, 10000.0, None, "cpu")[M + filled - 1 + torch.arange(n if per_row else 1)]
            kd2, vd2 = kd.clone(), vd.clone()
            ref = bifurcated_attention(store_decode(qr, kr, vr, freqs[:, None], kd, vd, slot), kc, vc, kd, vd, slot)
            out = bt.run_rope_decode_attention(qr, kr, vr, freqs[:, None], kc, vc, kd2, vd2, slot + M, M)
            worst = max(worst, rel(out, ref), rel(kd2, kd), rel(vd2, vd))
    # several prompts: prefix (or none), prompts of unequal lengths, own slots
    for Np, n, H, Hkv, Mp, L, D, T, filled in [(3, 2, 4, 2, 40, 70, 16, 8, 5), (2, 4, 4, 4, 0, 65, 16, 8, 8),
                                                (2, 3, 2, 2, 64, 33, 16, 8, 2)]:
        B = Np * n
        q, kp, vp = torch.randn(B, H, 1, D), torch.randn(Hkv, Mp, D), torch.randn(Hkv, Mp, D)
        km, vm, lens = torch.randn(Np, Hkv, L, D), torch.randn(Np, Hkv, L, D), torch.randint(1, L + 1, (Np,))
        kd, vd, slot = torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D), torch.tensor([filled - 1])
        ref = prefix_attention(q, kp, vp, km, vm, lens, kd, vd, slot)
        for side, tiles in ((False, bt.Tiles()), (True, bt.Tiles()), (False, bt.Tiles(tma=True))):
            levels = bt.prefix_levels(q, kp, vp, km, vm, lens, tiles)
            worst = max(worst, rel(bt.attend_levels(q, levels, kd, vd, slot, 0, tiles, side=side), ref))
# a decode step of the three-level cache (bifurcated.PrefixCache), its kernels' way (the slot from the
# positions and the first prompt's length, a device tensor) against its plain-PyTorch way, for two sets
# of prompts in the same cache (set_prompts)
import bifurcated
Np, n, H, Hkv, Mp, D, T = 3, 2, 4, 2, 24, 16, 6
ways = []
for kernels in (True, False):
    bifurcated.fast = lambda q, k=kernels: k
    torch.manual_seed(1)
    cache = bifurcated.PrefixCache(n, Hkv, D, Mp, [9, 20, 5], T, torch.float32, prompt_capacity=30)
    for lens, step in (([9, 20, 5], 3), ([30, 2, 17], 4)):
        cache.set_prompts(lens)
        for t in (cache.k_pre, cache.v_pre, cache.k_prm, cache.v_prm, cache.k_dec, cache.v_dec):
            t.copy_(torch.randn(t.shape))
        pos = torch.tensor([Mp + L + step for L in lens]).repeat_interleave(n)[:, None]  # (B, 1)
        freqs = precompute_freqs_cis(128, D, 10000.0, None, "cpu")[pos[:, 0]][:, None]  # (B, 1, D/2, 2)
        qkv = torch.randn(Np * n, 1, (H + 2 * Hkv) * D)
        qr, kr, vr = (t.view(Np * n, 1, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
        ways.append((cache(qr, kr, vr, freqs, pos), cache.k_dec.clone()))
half = len(ways) // 2
for (out, kd), (ref, kd_ref) in zip(ways[:half], ways[half:]):
    worst = max(worst, rel(out, ref), rel(kd, kd_ref))
print("worst relative error", worst)
assert worst < 1e-5, worst
"""


LINEAR = """
import torch
import linear_triton as lt
import quantize
from model import swiglu

def rel(out, ref):
    return ((out - ref).norm() / ref.norm()).item()

torch.manual_seed(0)
worst = worst16 = worst_digits = 0.0
for M, N, K in [(3, 64, 256), (1, 48, 160), (17, 96, 512)]:  # rows, output and input channels
    x, w, res = torch.randn(M, K), torch.randn(N, K) * 0.05, torch.randn(M, N)
    ref = x @ w.t()
    q, s = quantize.quantize_int8(w)
    ref8 = x @ quantize.dequantize_int8(q, s).t()
    packed, sz = quantize.quantize_int4(w, 32)
    ref4 = x @ quantize.dequantize_int4(packed, sz, 32).t()
    # splits of K from the SM count (4 on a CPU), none, and 3
    for tiles in (lt.Tiles(block_n=32, block_k=64), lt.Tiles(block_n=16, block_k=32, splits=1),
                  lt.Tiles(block_n=16, block_k=64, splits=3)):
        worst = max(worst, rel(lt.run_linear(x, w, None, tiles=tiles), ref))
        worst = max(worst, rel(lt.run_linear(x, w, None, tiles=tiles, residual=res), ref + res))
        worst = max(worst, rel(lt.run_linear(x, w, None, tiles=tiles, swiglu=True), swiglu(ref)))
        worst = max(worst, rel(lt.run_linear(x, q, s, tiles=tiles), ref8))
        # the weight's tiles through a tensor descriptor (Tiles.tma; rows and channels past N and K: zeros)
        tt = lt.Tiles(block_n=tiles.block_n, block_k=tiles.block_k, splits=tiles.splits, tma=True)
        for args, kw, expected in [((w, None), {}, ref), ((w, None), dict(residual=res), ref + res),
                                   ((w, None), dict(swiglu=True), swiglu(ref)), ((q, s), {}, ref8),
                                   ((q, s), dict(swiglu=True), swiglu(ref8))]:
            worst = max(worst, rel(lt.run_linear(x, *args, tiles=tt, **kw), expected))
        # int8 with x in digits (Tiles.digits: x to a 16-bit fixed point a row, max|x| 2^-16 off at most)
        td = lt.Tiles(block_n=tiles.block_n, block_k=tiles.block_k, splits=tiles.splits, digits=True)
        for kw, expected in [({}, ref8), (dict(residual=res), ref8 + res), (dict(swiglu=True), swiglu(ref8))]:
            worst_digits = max(worst_digits, rel(lt.run_linear(x, q, s, tiles=td, **kw), expected))
        t4 = lt.Tiles(block_n=tiles.block_n, block_k=32, splits=tiles.splits)  # within a group of 32
        worst = max(worst, rel(lt.run_linear(x, packed, sz, tiles=t4, group=32), ref4))
        worst = max(worst, rel(lt.run_linear(x, packed, sz, tiles=t4, group=32, swiglu=True), swiglu(ref4)))
    # int4 at one row on the CUDA cores (Tiles.gemv: with x's fp16 pairs, x rounded to fp16, 2^-11): two
    # groups a step (block_k 64), one, the whole row (a power of 2 of groups, masked past K), rows not a
    # multiple of the program's; more rows take the tensor-core kernel
    for tiles in (lt.Tiles(block_n=32, block_k=64, gemv=True), lt.Tiles(block_n=2, block_k=32, gemv=True),
                  lt.Tiles(block_n=4, gemv=True)):
        for kw, expected in [({}, ref4), (dict(residual=res), ref4 + res), (dict(swiglu=True), swiglu(ref4))]:
            err = rel(lt.run_linear(x, packed, sz, tiles=tiles, group=32, **kw), expected)
            worst, worst16 = (worst, max(worst16, err)) if M == 1 else (max(worst, err), worst16)
# w13's one-row kernel writing the next layer's x as its fp16 pairs (pairs=True): gemv_input's bits, and w2
# (3 groups of 16: a masked step) gives from them what it gives from x
x, t = torch.randn(1, 64), lt.Tiles(block_n=4, gemv=True)
w13, sz13 = quantize.quantize_int4(torch.randn(96, 64) * 0.05, 32)  # F = 48
w2, sz2 = quantize.quantize_int4(torch.randn(24, 48) * 0.05, 16)
res = torch.randn(1, 24)
act = lt.run_linear(x, w13, sz13, tiles=t, group=32, swiglu=True)
pairs = lt.run_linear(x, w13, sz13, tiles=t, group=32, swiglu=True, pairs=True)
assert pairs.dtype == torch.int16 and pairs.shape == act.shape
assert torch.equal(pairs, lt.gemv_input(act))
assert torch.equal(lt.run_linear(pairs, w2, sz2, tiles=t, group=16, residual=res),
                   lt.run_linear(act, w2, sz2, tiles=t, group=16, residual=res))
# the bf16 default tiles by rows (default_tiles): from 32 rows, 64 channels in 3 stages (N / 128 programs
# short of the SMs) or 128 channels a program; at 64 rows, narrow layers in one split
for M, N, K in [(40, 4096, 64), (20, 8192, 64), (33, 8192, 64), (64, 8200, 128)]:
    x, w, res = torch.randn(M, K), torch.randn(N, K) * 0.05, torch.randn(M, N)
    ref = x @ w.t()
    worst = max(worst, rel(lt.run_linear(x, w, None, residual=res), ref + res))
    worst = max(worst, rel(lt.run_linear(x, w, None, swiglu=True), swiglu(ref)))
# a decode step's qkv layer with RoPE on q and k and the store of k and v in the epilogue (run_linear's rope)
# == the product, then bifurcated.store_decode; tiles of half a head and of a whole one, positions shared or per row
from bifurcated import store_decode
from model import precompute_freqs_cis
for n, H, Hkv, D, K, T in [(3, 4, 2, 16, 64, 5), (2, 2, 1, 32, 96, 3)]:
    N = (H + 2 * Hkv) * D
    x, w = torch.randn(n, K), torch.randn(N, K) * 0.05
    q8, s8 = quantize.quantize_int8(w)
    p4, sz4 = quantize.quantize_int4(w, 32)
    for weight, scales, group, wd in [(w, None, 0, w), (q8, s8, 0, quantize.dequantize_int8(q8, s8)),
                                      (p4, sz4, 32, quantize.dequantize_int4(p4, sz4, 32))]:
        qr, kr, vr = (t.view(n, 1, -1, D) for t in (x @ wd.t()).split([H * D, Hkv * D, Hkv * D], dim=-1))
        for per_row in (False, True):
            freqs = precompute_freqs_cis(64, D, 10000.0, None, "cpu")[20 + torch.arange(n if per_row else 1)]
            kd, vd, slot = torch.randn(n, Hkv, T, D), torch.randn(n, Hkv, T, D), torch.tensor([7 + 2])
            kd2, vd2 = kd.clone(), vd.clone()
            ref = store_decode(qr, kr, vr, freqs[:, None], kd, vd, slot - 7)
            for tiles in (lt.Tiles(block_n=16, block_k=32, splits=1), lt.Tiles(block_n=D, block_k=32, splits=1)):
                q = lt.run_linear(x, weight, scales, tiles=tiles, group=group,
                                  rope=(freqs.reshape(-1, D), kd2, vd2, slot, 7))
                worst = max(worst, rel(q.view(n, H, 1, D), ref), rel(kd2, kd), rel(vd2, vd))
# the digits: in [-127, 127], and (256 hi + lo) row_scale within row_scale / 2 of x, plus the rounding of the fp32
# quotient x / row_scale (at most DIGITS_MAX 2^-24 of a step; seen up to 0.5009 steps)
x = torch.randn(5, 300) * torch.logspace(-3, 3, 5)[:, None]
hi, lo, row_scale = lt.int8_digits(x)
assert hi.dtype == lo.dtype == torch.int8 and hi.shape == lo.shape == x.shape
assert hi.abs().max() <= 127 and lo.abs().max() <= 127
back = (256 * hi.double() + lo.double()) * row_scale.double()[:, None]
assert ((back - x.double()).abs() <= row_scale.double()[:, None] * (0.5 + lt.DIGITS_MAX * 2.0**-24)).all()
print("worst relative error", worst, "with fp16 pairs", worst16, "with x in digits", worst_digits)
assert worst < 1e-5 and 0 < worst16 < 1e-3 and 0 < worst_digits < 1e-4, (worst, worst16, worst_digits)
"""

# Tiles.tma under torch.compile: Inductor keeps an argument that is not a tensor as a constant of its graph (in an
# op's body, a descriptor of a fake tensor), so the kernels that take TMA descriptors run through the opaque op
# tma::launch, which makes them when it runs (tma.py). Here Inductor (its CPU code around the interpreter's
# kernels) compiles the linear layers with the TMA on: plain with a residual, SwiGLU, and the qkv layer that rotates
# and stores k and v in the caches (written in place, not copies), against the same ops run eagerly
COMPILED_TMA = """
import dataclasses, torch
import linear_triton as lt
from model import precompute_freqs_cis

def rel(out, ref):
    return ((out - ref).norm() / ref.norm()).item()

base = lt.default_tiles
lt.default_tiles = lambda *a, **k: dataclasses.replace(base(*a, **k), tma=True, block_n=16, block_k=32, splits=1)
torch.manual_seed(0)
n, H, Hkv, D, K, T = 3, 4, 2, 16, 64, 5
N = (H + 2 * Hkv) * D
x, w, res, w13 = torch.randn(n, 1, K), torch.randn(N, K) * 0.05, torch.randn(n, 1, N), torch.randn(2 * N, K) * 0.05
freqs = precompute_freqs_cis(64, D, 10000.0, None, "cpu")[20:21][:, None]  # (1, 1, D/2, 2)
kd, vd, slot = torch.randn(n, Hkv, T, D), torch.randn(n, Hkv, T, D), torch.tensor([9])

def step(x, res, kd, vd):  # pointwise ops before and after, which Inductor fuses around the launches
    h = torch.nn.functional.silu(x)
    q = lt.qkv_rope(h, w, None, 0, freqs, kd, vd, slot, 7)  # (n, H, 1, D); kd, vd written in slot 2
    return q * 2, lt.linear(h, w, residual=res) + 1, lt.linear(h * 3, w13, swiglu=True)

eager_kv, compiled_kv = (kd.clone(), vd.clone()), (kd.clone(), vd.clone())
ref = step(x, res, *eager_kv)
out = torch.compile(step, fullgraph=True)(x, res, *compiled_kv)
worst = max(rel(o, r) for o, r in zip(out + compiled_kv, ref + eager_kv))
assert not torch.equal(eager_kv[0], kd) and not torch.equal(eager_kv[1], vd)
print("worst relative error", worst)
assert worst < 1e-6, worst
"""


# torch 2.11's wrap_triton (which makes a launch traceable by torch.compile) refuses the interpreter's
# kernels; these launches run eagerly, where it only launches, so they go to the kernels directly
EAGER_LAUNCHES = "import torch\ntorch.library.wrap_triton = lambda kernel: kernel\n"


def interpret(code: str):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", EAGER_LAUNCHES + code], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "worst relative error" in r.stdout


def test_attention_kernels_in_the_interpreter():
    interpret(ATTENTION)


def test_linear_kernels_in_the_interpreter():
    interpret(LINEAR)


def test_compiled_linear_layers_with_tma():
    interpret(COMPILED_TMA)


def sass_loop():
    pytest.importorskip("triton")
    sys.path.insert(0, str(ROOT / "scripts"))
    import sass_loop
    return sass_loop


def compile_default(kind: str, N: int, M: int, K: int, row_tiles: bool, **epilogue):
    # _linear_kernel (or int4's one-row kernel) on default_tiles' tiles for this layer, compiled for sm_90
    lt = pytest.importorskip("linear_triton")
    t = lt.default_tiles(kind, N, M, 132, row_tiles, epilogue.get("SWIGLU", False), K)
    if t.gemv:
        return sass_loop().compile_gemv(t.block_n, t.block_k, t.stages, t.warps, **epilogue)
    weight = torch.empty(0, dtype=torch.bfloat16 if kind == "bf16" else torch.int8)  # its element size
    block_k = lt.k_tile(t, weight, 128 if kind == "int4" else 0)  # int4 in groups of 128
    block_m = lt.linear_plan(M, N, K, block_k, 132, t)[0]
    path = kind + ("-f16" if t.f16 else "-digits" if t.digits else "-xperm" if t.xperm else "")
    return sass_loop().compile_linear(path, block_m, t.block_n, block_k, t.stages, t.warps, **epilogue)


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("N,M,K,epilogue,row_tiles", [  # Llama-2-7B's layers (N, rows, K) on an H100, and an H200
    (4096, 1, 4096, dict(RESIDUAL=True), False), (22016, 1, 4096, dict(SWIGLU=True), False),
    (12288, 32, 4096, {}, False), (4096, 32, 11008, dict(RESIDUAL=True), False),
    (22016, 32, 4096, dict(SWIGLU=True), False), (22016, 32, 4096, dict(SWIGLU=True), True),
    (4096, 64, 4096, dict(RESIDUAL=True), False)], ids=str)
def test_linear_kernels_compile_for_sm90(kind, N, M, K, epilogue, row_tiles):
    # what the interpreter does not check: that Triton's compiler and ptxas take the linear kernels, on the tiles
    # the layers run on and with their epilogues, for an H100 (sm_90); no GPU needed (scripts/sass_loop.py)
    k = compile_default(kind, N, M, K, row_tiles, **epilogue)
    assert k.asm["cubin"] and ".target sm_90" in k.asm["ptx"]


@pytest.mark.parametrize("kind,M,K", [("bf16-tma", 16, 128), ("int8-tma", 32, 128), ("int8-digits-tma", 32, 256)])
def test_linear_kernel_with_tma_compiles_for_sm90(kind, M, K):
    # Tiles.tma: the weight's tiles copied by the tensor memory accelerator (cp.async.bulk.tensor), the products
    # on wgmma, compiled for sm_90 (scripts/sass_loop.py's kinds)
    k = sass_loop().compile_linear(kind, M, 64, K, 4, 4, SWIGLU=True)
    assert "cp.async.bulk.tensor" in k.asm["ptx"] and k.asm["cubin"]


@pytest.mark.parametrize("block_r,block_n,hkv", [(32, 128, 32), (64, 64, 8)], ids=["mha-n32", "gqa-n32"])
def test_context_own_kernel_with_tma_compiles_for_sm90(block_r, block_n, hkv):
    # bifurcated_triton.Tiles.tma: the level's blocks of keys and values by the TMA (cp.async.bulk.tensor), the own
    # slots and the masked block still pipelined through cp.async; the plans of 8K n = 32, MHA and GQA, for sm_90
    k = sass_loop().compile_context(True, block_r, block_n, 128, 3, 4, hkv)
    assert "cp.async.bulk.tensor" in k.asm["ptx"] and "cp.async.cg" in k.asm["ptx"] and k.asm["cubin"]


@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("M", [1, 8, 32, 64])
@pytest.mark.parametrize("per_row", [False, True], ids=["one-position", "positions-per-row"])
def test_qkv_rope_epilogue_compiles_for_sm90(kind, M, per_row):
    # wqkv's RoPE and k/v store (run_linear's rope) on its tiles, compiled for sm_90 as above
    k = compile_default(kind, 12288, M, 4096, False, ROPE=128, QN=4096, KVN=4096, ROPE_ROWS=per_row)
    assert k.asm["cubin"]


def test_own_slots_in_the_context_programs_where_measured_faster():
    # own_in_level's rule, on the plans of attention-own-in-level.md's rows (H100): MHA with 8 or 16 samples
    # for 8 programs a KV head, yes; one sample, GQA, several prompts' levels, too many own slots: no
    bt = pytest.importorskip("bifurcated_triton")
    level = lambda plan, lens=None: bt.Level(None, None, lens, plan)
    assert bt.own_in_level(8, 1, 128, level((16, 8, 1024))) and bt.own_in_level(16, 1, 128, level((16, 8, 4096)))
    assert not bt.own_in_level(1, 1, 128, level((16, 8, 1024)))  # one program would take them all
    assert not bt.own_in_level(16, 4, 128, level((64, 16, 512)))  # GQA: its own programs are short
    assert not bt.own_in_level(8, 1, 128, level((16, 8, 1024), lens=object()))  # a prompt's level of a group
    assert not bt.own_in_level(16, 1, 128, level((16, 8, 512)))  # 2 x 128 slots: half of the 512 keys


def test_linear_tiles_by_rows_where_measured_faster(monkeypatch):
    # default_tiles' bf16 tiles from 17 rows on the GPUs of ROW_TILE_GPUS (H200) and in the interpreter;
    # an H100, where they were slower (tiles-ab.md), keeps the 16-row tiles at every row count
    lt = pytest.importorskip("linear_triton")
    for name, mine in [("NVIDIA H200", True), ("NVIDIA H100 80GB HBM3", False)]:
        props = SimpleNamespace(name=name)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None, props=props: props)
        assert lt.row_tiles_on(torch.device("cuda")) == mine
    assert lt.row_tiles_on(torch.device("cpu"))
    for M in (32, 64):
        for N in (4096, 12288, 22016):  # wo, wqkv, w13
            on_h100 = lt.default_tiles("bf16", N, M, 132, row_tiles=False)
            assert on_h100 == lt.default_tiles("bf16", N, 1, 132)
        assert lt.default_tiles("bf16", 22016, M, 132) != lt.default_tiles("bf16", 22016, 1, 132)


def test_gemv_input_compiled_matches_eager():
    # int4's one-row kernel reads x's fp16 pairs as contiguous (4, K / 8) int32 rows, from an int16 tensor of x's
    # size that torch ops make and Inductor compiles (the kernel reads it in pairs: a dtype view to int32 of a
    # tensor Inductor computes failed there); here after an op that rounds nothing
    lt = pytest.importorskip("linear_triton")
    x = torch.randn(1, 512).to(torch.bfloat16)
    op = lambda x: lt.gemv_input(x * 2)
    pairs, pairs_c = op(x), torch.compile(op, fullgraph=True)(x)
    assert pairs.shape == (1, 512) and pairs.dtype == torch.int16 and pairs_c.is_contiguous()
    assert torch.equal(pairs, pairs_c)
    # [t, c]: the fp16 bits of channels 8c + (t ^ 1) (low half) and 8c + 4 + (t ^ 1) (high half)
    bits = (x.float() * 2.0 ** -lt.GEMV_SHIFT).to(torch.float16).view(torch.int16).view(-1, 8)
    p = lt.gemv_input(x).view(torch.int32).view(4, -1)
    lo, hi = lambda t, c: ((p[t, c].item() & 0xFFFF) ^ 0x8000) - 0x8000, lambda t, c: p[t, c].item() >> 16
    assert lo(2, 5) == bits[5, 3].item() and hi(1, 7) == bits[7, 4].item() and hi(0, 7) == bits[7, 5].item()
