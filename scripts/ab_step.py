# Whole decode steps of several variants of the code, in one process: one model, one measurement of the
# rates, the variants interleaved (A B A B ...) so that a drift of the machine falls on all of them.
# A variant replaces a function of linear_triton or bifurcated_triton that picks tiles or a launch plan.
# Those run while torch.compile traces the custom ops, and neither Inductor's on-disk cache nor
# AOTAutograd's keys on them: with the caches on, every variant after the first would run the first one's
# compiled step (bench/results/h100-80gb-hbm3/int8-f16.md). So both caches are off here, and each variant
# compiles its own step.
#
#   python scripts/ab_step.py --variants main context-1-wave context-4-waves --contexts 1024 --samples 1 --e2e
#   python scripts/ab_step.py --variants main int8-bf16 int8-f16-all --weights int8 --output ab.json
import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import shlex
import sys
import traceback
from pathlib import Path
from typing import Optional
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, as a script

import torch
import torch._functorch.config
import torch._inductor.config

import benchmark
import bifurcated_triton as bt
import generate
import linear_triton as lt


def context_tiles(**changes):
    """The context launches' plan with these changes to its tiles (waves=: programs per SM, at every number of
    rows; wide_rows=: rows per KV head from which blocks of 128 rows go in one wave)."""
    plan = bt.context_plan
    return bt, "context_plan", lambda R, M, n_kv_heads, n_sm, tiles=bt.Tiles(): plan(
        R, M, n_kv_heads, n_sm, dataclasses.replace(tiles, **changes))


def attention_rows(waves: int, block_n: int):
    """The decode attention at 32 to 64 rows per KV head (Tiles.mid_rows: one wave, 128 keys a step where a
    split holds 2048 or more) on these waves and keys a step instead."""
    def rows_tiles(R, M, n_kv_heads, n_sm, tiles):
        if tiles.mid_rows is None or not tiles.mid_rows[0] <= R <= tiles.mid_rows[1]:
            return tiles
        return dataclasses.replace(tiles, mid_rows=None, waves=waves, block_n=block_n)
    return bt, "rows_tiles", rows_tiles


def tiles_patch(pick):
    """linear_triton.default_tiles replaced: pick(base, kind, N, M, n_sm, row_tiles, swiglu, K) -> Tiles, base
    the function it replaces (base(kind, N, M, ...) gives main's tiles)."""
    base = lt.default_tiles

    def default_tiles(kind, N, M=1, n_sm=132, row_tiles=True, swiglu=False, K=0):
        return pick(base, kind, N, M, n_sm, row_tiles, swiglu, K)
    return lt, "default_tiles", default_tiles


def int8_f16(wide: bool, narrow: bool):
    """int8 layers with x in fp16 (Tiles.f16) where asked, Triton's conversion to bf16 elsewhere."""
    def pick(base, kind, N, *args):
        t = base(kind, N, *args)
        return dataclasses.replace(t, f16=wide if N >= lt.WIDE else narrow, digits=False) if kind == "int8" else t
    return tiles_patch(pick)


def int4_tiles(wide: "lt.Tiles", narrow: "lt.Tiles"):
    """int4 from 5 rows on these tiles: wide layers (wqkv, w13), narrow ones (wo, w2)."""
    def pick(base, kind, N, *args):
        t = base(kind, N, *args)
        return (wide if N >= lt.WIDE else narrow) if kind == "int4" and not t.gemv else t
    return tiles_patch(pick)


INT4_BEFORE = lt.Tiles(block_n=64, block_k=128, stages=3)  # before int4-m32.md (x in its own order)


def gemv_without_pairs():
    """int4's one-row kernel with x's pairs made before each layer (gemv_input), none by w13's epilogue."""
    run_gemv = lt.run_gemv
    return [(lt, "GEMV_ROWS", 1), (lt, "run_gemv", lambda *args: run_gemv(*args[:7]))]


def dense_add_after():
    """Above MAX_M rows, wo's and w2's residual added after cuBLAS's product (where Inductor joins it to the next
    norm), not in the product's epilogue (addmm: a copy of the residual into the output, then a product with
    beta = 1)."""
    dense = lt.dense_linear

    def dense_linear(x, weight, scales, group, swiglu, residual, eager):
        y = dense(x, weight, scales, group, swiglu, None, eager)
        return y if residual is None else residual + y
    return lt, "dense_linear", dense_linear


def partials_fp32():
    """The attention's partial outputs (each context split's, the own slots') in fp32 rather than q's dtype."""
    new_partials = bt.new_partials

    def fp32_partials(P, q, Hkv):
        o, l = new_partials(P, q, Hkv)
        return o.float(), l
    return bt, "new_partials", fp32_partials


def cudnn_q_copy():
    """cuDNN's context launches with their query, the R rows of a KV head for each of P splits, copied into P
    replicas first rather than passed as a stride-0 view."""
    sdpa = torch.ops.aten._scaled_dot_product_cudnn_attention

    def sdpa_q_copy(q, *args):
        return sdpa(q.contiguous(), *args)
    sdpa_q_copy.default = sdpa.default  # what the compiled code calls
    return torch.ops.aten, "_scaled_dot_product_cudnn_attention", sdpa_q_copy


def narrow_tiles_before():
    """bf16 layers narrower than linear_triton.WIDE at 17 to 32 rows in 32-channel programs, however many (before
    64-channel ones where those are more than the SMs)."""
    def pick(base, kind, N, M, n_sm, row_tiles, *args):
        narrow = kind == "bf16" and N < lt.WIDE and 16 < M <= 32 and not row_tiles
        return lt.Tiles(block_k=128, splits=1, stages=8) if narrow else base(kind, N, M, n_sm, row_tiles, *args)
    return tiles_patch(pick)


def int8_x_fp16():
    """int8 as before int8-digits.md: the wide layers' x in fp16 at every row count (their one-row tiles)."""
    return tiles_patch(lambda base, kind, N, M, *args: base(kind, N, 1 if kind == "int8" else M, *args))


def int8_digits(every: bool, wide: "lt.Tiles | None" = None):
    """int8 layers with x in digits (Tiles.digits) at every row count: the wide ones, or every one, on main's
    tiles; wide: the wide ones on these tiles instead (int8-digits.md's first A/B ran these on the x-in-fp16
    tiles, main's then)."""
    def pick(base, kind, N, *args):
        t = base(kind, N, *args)
        if kind != "int8" or not (N >= lt.WIDE or every):
            return t
        return dataclasses.replace(wide if wide is not None and N >= lt.WIDE else t, f16=False, digits=True)
    return tiles_patch(pick)


def layer_tiles(weights: str, layer: str, new: "lt.Tiles", *more):
    """One kind of layer of these weights at 17 to 32 rows on these tiles: "narrow" (N < WIDE and at most one
    32-channel program an SM, so not Mistral-7B's wqkv), or of those "wo" (K <= N) or "w2" (K > N); "wqkv" (wide,
    no SwiGLU) or "w13"; more: further (layer, tiles) pairs."""
    chosen = dict([(layer, new), *zip(more[::2], more[1::2])])

    def pick(base, kind, N, M, n_sm, row_tiles, swiglu, K):
        narrow = ["narrow", "wo" if K <= N else "w2"] if -(-N // 32) <= n_sm else []
        hits = [chosen[x] for x in (["w13"] if swiglu else ["wqkv"] if N >= lt.WIDE else narrow) if x in chosen]
        return hits[0] if kind == weights and hits and 16 < M <= 32 else base(kind, N, M, n_sm, row_tiles, swiglu, K)
    return tiles_patch(pick)


def tma_tiles(wide: bool, narrow: bool):
    """bf16 and int8 layers with the weight's tiles copied by the TMA (Tiles.tma), wide and / or narrow ones."""
    def pick(base, kind, N, *args):
        t = base(kind, N, *args)
        return dataclasses.replace(t, tma=wide if N >= lt.WIDE else narrow) if kind in ("bf16", "int8") else t
    return tiles_patch(pick)


def tma_attention():
    """The decode attention's context blocks copied by the TMA (bifurcated_triton.Tiles.tma)."""
    base = bt.rows_tiles
    return bt, "rows_tiles", lambda *args: dataclasses.replace(base(*args), tma=True)


def narrow_rows(tiles: lt.Tiles, rows: int = 256, wide: Optional[lt.Tiles] = None):
    """Above MAX_M and up to `rows` rows (MHA n = 128 to 256), the narrow bf16 layers (wo, w2) on the Triton kernel
    with these tiles instead of cuBLAS's addmm, and with `wide` the wide ones (wqkv; w13 and its SwiGLU) on these;
    the other layers stay on cuBLAS (bench_linear.py --max_m times them alone)."""
    base, max_m = lt.run_linear, lt.MAX_M

    def run_linear(x, weight, scales, tiles_=None, group=0, swiglu=False, residual=None, pairs=False, rope=None):
        if max_m < x.shape[0] <= rows and rope is None:  # (base takes them: MAX_M is `rows` meanwhile)
            mine = tiles if weight.shape[0] < lt.WIDE else wide
            if mine is not None and scales is None and not group:
                return base(x, weight, scales, tiles_ or mine, group, swiglu, residual, pairs, rope)
            return lt.dense_linear(x, weight, scales, group, swiglu, residual, eager=False)
        return base(x, weight, scales, tiles_, group, swiglu, residual, pairs, rope)
    return [(lt, "MAX_M", rows), (lt, "run_linear", run_linear)]


T = lt.Tiles
LAYER_TILES = {  # name: (weights, layer, tiles). bench/results/h100-80gb-hbm3/narrow-tiles.md ran these when main had
    # the tiles of the two "-before" ones (since: Llama-2-7B's w2 as bf16-w2-64-s2, int8's wqkv as int8-wqkv-64-k256)
    "bf16-narrow-before": ("bf16", "narrow", T(block_k=128, splits=1, stages=8)),
    "int8-wqkv-before": ("int8", "wqkv", T(block_n=64, block_k=128, waves=1, stages=4, digits=True)),
    "int8-narrow-32-s1": ("int8", "narrow", T(block_n=32, block_k=128, splits=1, stages=8)),
    "int8-narrow-32-s1-k256": ("int8", "narrow", T(block_n=32, block_k=256, splits=1, stages=4)),
    "int8-narrow-64-s2": ("int8", "narrow", T(block_n=64, block_k=128, splits=2, stages=4)),
    "int8-narrow-32-s2": ("int8", "narrow", T(block_n=32, block_k=128, splits=2, stages=6)),
    "int8-narrow-32-w2": ("int8", "narrow", T(block_n=32, block_k=128, waves=2)),
    "int8-narrow-32-w4": ("int8", "narrow", T(block_n=32, block_k=128, waves=4)),
    "int8-narrow-32-k256-w3": ("int8", "narrow", T(block_n=32, block_k=256, waves=3, stages=3)),
    "int8-narrow-32-w3-st6": ("int8", "narrow", T(block_n=32, block_k=128, waves=3, stages=6)),
    "int8-wqkv-64-st3": ("int8", "wqkv", T(block_n=64, block_k=128, waves=1, stages=3, digits=True)),
    "int8-wqkv-64-st5": ("int8", "wqkv", T(block_n=64, block_k=128, waves=1, stages=5, digits=True)),
    "int8-wqkv-32": ("int8", "wqkv", T(block_n=32, block_k=128, waves=1, stages=4, digits=True)),
    "int8-wqkv-128": ("int8", "wqkv", T(block_n=128, block_k=128, waves=1, stages=4, digits=True)),
    "int8-wqkv-64-k256": ("int8", "wqkv", T(block_n=64, block_k=256, waves=1, stages=3, digits=True)),
    "bf16-narrow-64-s2": ("bf16", "narrow", T(block_n=64, block_k=128, splits=2, stages=4)),
    "bf16-wo-64-s2": ("bf16", "wo", T(block_n=64, block_k=128, splits=2, stages=4)),
    "bf16-w2-64-s2": ("bf16", "w2", T(block_n=64, block_k=128, splits=2, stages=4)),
    "bf16-narrow-32-s2": ("bf16", "narrow", T(block_n=32, block_k=128, splits=2, stages=6)),
    "bf16-narrow-64-s2-st3": ("bf16", "narrow", T(block_n=64, block_k=128, splits=2, stages=3)),
    "bf16-narrow-64-s2-st5": ("bf16", "narrow", T(block_n=64, block_k=128, splits=2, stages=5)),
    "bf16-narrow-64-s2-k64": ("bf16", "narrow", T(block_n=64, block_k=64, splits=2, stages=6)),
    "bf16-narrow-64-s3": ("bf16", "narrow", T(block_n=64, block_k=128, splits=3, stages=4)),
    "bf16-narrow-128-s4": ("bf16", "narrow", T(block_n=128, block_k=64, splits=4, stages=4, warps=8)),
    "bf16-narrow-64-s2-w8": ("bf16", "narrow", T(block_n=64, block_k=128, splits=2, stages=4, warps=8)),
}


VARIANTS = {"main": lambda: None, "narrow-tiles-before": narrow_tiles_before, "partials-fp32": partials_fp32,
            "cudnn-q-copy": cudnn_q_copy, "context-1-wave": lambda: context_tiles(waves=1),
            "int8-digits": lambda: int8_digits(False), "int8-digits-all": lambda: int8_digits(True),
            "int8-digits-64": lambda: int8_digits(False, lt.Tiles(block_n=64, block_k=256, waves=1, stages=4)),
            "context-4-waves": lambda: context_tiles(waves=4), "context-wide-128": lambda: context_tiles(wide_rows=128),
            "attention-2-waves": lambda: attention_rows(2, 64), "attention-2-waves-128": lambda: attention_rows(2, 128),
            "attention-1-wave-64": lambda: attention_rows(1, 64), "int8-bf16": lambda: int8_f16(False, False),
            "int8-f16-all": lambda: int8_f16(True, True), "int8-x-fp16": int8_x_fp16,
            "int4-gemv": lambda: (lt, "GEMV_ROWS", 1), "int4-tinygemm": lambda: (lt, "GEMV_ROWS", 0),
            "int4-gemv-no-pairs": gemv_without_pairs,
            "int4-tiles-before": lambda: int4_tiles(INT4_BEFORE, INT4_BEFORE),
            "dense-add-after": dense_add_after, "context-no-cudnn": lambda: (bt, "cudnn_context", lambda *args: False),
            "rope-apart": lambda: (lt, "rope_operands", lambda *args: None),  # RoPE and the store not in wqkv's kernel
            "rope-bf16": lambda: (lt, "ROPE_KINDS", ("bf16", "int8")),  # bf16's wqkv takes RoPE and the store too
            "tma": lambda: tma_tiles(True, True), "tma-wide": lambda: tma_tiles(True, False),
            "tma-narrow": lambda: tma_tiles(False, True), "tma-attention": tma_attention,
            "tma-all": lambda: [tma_tiles(True, True), tma_attention()],
            "narrow-rows-64-s2": lambda: narrow_rows(T(block_n=64, block_k=64, splits=2, stages=4, warps=8)),
            "narrow-rows-128-s2": lambda: narrow_rows(T(block_n=128, block_k=64, splits=2, stages=3, warps=8)),
            "side-256": lambda: (bt, "SIDE_ROWS", 256),  # MHA n = 256's own slots on the second stream too
            "rows-all-128": lambda: narrow_rows(T(block_n=128, block_k=64, splits=2, stages=3, warps=8),
                                                wide=T(block_n=128, block_k=64, splits=1, stages=3, warps=8)),
            "int4-narrow-128": lambda: int4_tiles(lt.default_tiles("int4", lt.WIDE, 32),
                                                  lt.Tiles(block_n=128, block_k=128, stages=3)),
            **{name: (lambda v: lambda: layer_tiles(*v))(v) for name, v in LAYER_TILES.items()},
            "int8-wqkv-k256-narrow-k256": lambda: layer_tiles(*LAYER_TILES["int8-wqkv-64-k256"],
                                                              *LAYER_TILES["int8-narrow-32-k256-w3"][1:])}


def caches_off() -> contextlib.ExitStack:
    """Inductor's and AOTAutograd's caches off, until the block ends."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
    stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
    return stack


def with_variant(variant: str, run):
    """run() with the variant's replacement in place, the original back after."""
    patches = VARIANTS[variant]()  # (module, name, replacement), a list of them, or None
    with contextlib.ExitStack() as stack:
        for patch in [patches] if isinstance(patches, tuple) else patches or []:
            stack.enter_context(mock.patch.object(*patch))
        return run()


def main(variants: list[str], model: str, contexts: list[int], samples: list[int], weights: str, e2e: bool,
         repeat: int, max_new_tokens: int, device: str, dtype: str, output: str | None) -> list[dict]:
    dev = generate.resolve_device(device)
    torch_dtype = generate.resolve_dtype(dtype, dev)
    compile = dev.type == "cuda"
    rates = benchmark.measure_rates(dev, torch_dtype, **benchmark.RATE_SIZES[dev.type])
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{gpu}: read {rates[0] / 1e9:.0f} GB/s", flush=True)
    net, size = benchmark.load_synthetic(model, weights, dev, torch_dtype)
    result = dict(command=shlex.join(["python"] + sys.argv), torch=torch.__version__, gpu=gpu, dtype=dtype,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  read_bandwidth_gbps=rates[0] / 1e9, rows=[])
    configs = [(M, n) for M in contexts for n in samples] + ([None] if e2e else [])
    with caches_off():
        for rep, config, variant in itertools.product(range(repeat), configs, variants):
            net.last_run = None
            benchmark.release(dev, compile)
            try:  # a variant that fails (its first run on a GPU, say) is a row of its own; the others still run
                if config is None:
                    row = with_variant(variant, lambda: benchmark.measure_e2e(net, model, compile, 3, weights))
                    line = f"e2e: {row['tokens_per_s']:.1f} tokens/s, {row['ms_per_step']:.3f} ms/step"
                else:
                    row = with_variant(variant, lambda: benchmark.measure(
                        net, model, "bifurcated", config[1], config[0], max_new_tokens, compile, 3, rates, weights,
                        size))
                    line = (f"{config[0]} n={config[1]}: {row['ms_per_step']:.3f} ms "
                            f"{[round(t, 3) for t in row['ms_per_step_runs']]} {row['pct_of_floor']:.1f}%")
            except Exception as e:  # any error of the variant's code, its traceback on stderr
                traceback.print_exc()
                row = dict(config=config, error=f"{type(e).__name__}: {e}"[:500])
                line = f"{config or 'e2e'}: failed: {row['error']}"
            row.update(variant=variant, rep=rep)
            result["rows"].append(row)
            print(f"{weights} {variant} {line}", flush=True)
            if output:
                Path(output).write_text(json.dumps(result, indent=1) + "\n")
    return result["rows"]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Whole decode steps of variants of the code, in one process.")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["main", "int8-bf16"])
    p.add_argument("--model", default="Llama-2-7B")
    p.add_argument("--contexts", type=int, nargs="*", default=[8192])
    p.add_argument("--samples", type=int, nargs="+", default=[32])
    p.add_argument("--weights", choices=["bf16", "int8", "int4"], default="bf16")
    p.add_argument("--e2e", action="store_true", help="also n = 1 end to end (1K prompt, 256 new tokens)")
    p.add_argument("--repeat", type=int, default=1, help="rounds over the variants")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--output", help="write every row to this JSON file")
    main(**vars(p.parse_args()))
