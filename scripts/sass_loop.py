# The instructions of linear_triton's main loop, without a GPU: compiles _linear_kernel for sm_90
# with Triton's own compiler and ptxas (pointers and sizes marked 16-aligned, as at a real launch,
# so that the loads are pipelined), disassembles it with cuobjdump, and counts the opcodes of the
# loop body (the code between a backward branch and its target), per thread, per K tile; and what ptxas
# says of the kernel (its registers; C7515 where it serialized the tensor-core products).
#
# An SM issues at most 4 warp instructions a clock and must take in about 11.5 bytes a clock for the
# H100's 3 TB/s: a loop above about 0.35 warp instructions per weight byte cannot stream at full
# bandwidth (bench/results/h100-80gb-hbm3/linear-int4-unpack.md).
#
#   python scripts/sass_loop.py int4 32 64 128 4      # weights (bf16, int8, int4), BLOCK_M, BLOCK_N, BLOCK_K, stages
#   python scripts/sass_loop.py int8-f16 32 64 128 4  # int8 with x in fp16 (linear_triton.Tiles.f16)
#   python scripts/sass_loop.py int8-digits 32 64 256 4  # int8 with x in digits (linear_triton.Tiles.digits)
#   python scripts/sass_loop.py int4-xperm 32 64 128 4  # int4 with x reordered (Tiles.xperm; wqkv's 16 K tiles a split)
#   python scripts/sass_loop.py bf16-tma 32 64 128 5  # the weight's tiles through a tensor descriptor (Tiles.tma)
#   python scripts/sass_loop.py gemv 1 64 128 1       # int4's one-row kernel (linear_triton.Tiles.gemv)
#   python scripts/sass_loop.py context 32 128 128 3  # the attention's context + own kernel (bifurcated_triton's
#   python scripts/sass_loop.py context-tma 32 128 128 3  # _context_own_kernel): BLOCK_R rows, BLOCK_N keys, D, stages
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import bifurcated_triton as bt
import linear_triton as lt

# a kind of weight on another path: its kind (-tma: the weight's tiles, or the context's blocks, through tensor
# descriptors: linear_triton.Tiles.tma, bifurcated_triton.Tiles.tma)
VARIANTS = {"int8-f16": "int8", "int8-digits": "int8", "int4-xperm": "int4", "bf16-tma": "bf16", "int8-tma": "int8",
            "int8-digits-tma": "int8", "context-tma": "context"}


def compile_gemv(block_n: int, block_k: int, stages: int, warps: int, **epilogue):
    # int4's one-row kernel (linear_triton.Tiles.gemv), groups of 128: block_k / 128 groups a loop step;
    # epilogue: more of its constexprs (SWIGLU, RESIDUAL)
    sig = {"XP": "*i16", "W": "*u8", "S": "*bf16", "Out": "*bf16", "Res": "*bf16", "N": "i32", "KG": "i32"}
    const = dict(KW=512, BLOCK_N=block_n, BLOCK_G=block_k // 128, GROUP=128, SWIGLU=False, RESIDUAL=False,
                 EVEN_N=True, EVEN_G=True, X_SCALE=2.0 ** lt.GEMV_SHIFT, WORD=lt._WORD)
    const.update(epilogue)
    sig.update({k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(7)}
    return triton.compile(ASTSource(lt._gemv_int4_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def compile_linear(kind: str, block_m: int, block_n: int, block_k: int, stages: int, warps: int, **epilogue):
    # epilogue: more of the kernel's constexprs (SWIGLU, RESIDUAL, ...)
    f16, xperm, digits = kind == "int8-f16", kind == "int4-xperm", kind.startswith("int8-digits")
    tma = kind.endswith("-tma")
    kind = VARIANTS.get(kind, kind)
    sig = {"X": "*fp16" if f16 else "*i8" if digits else "*bf16", "W": {"bf16": "*bf16", "int8": "*i8"}.get(kind, "*u8"),
           "S": "*bf16", "Out": "*bf16", "Res": "*bf16", "XL": "*i8", "XS": "*fp32", "Fr": "*fp32", "KD": "*bf16",
           "VD": "*bf16", "Slot": "*i64", "M": "i32", "N": "i32", "K": "i32", "CHUNK": "i32", "START": "i32",
           "DST_ROW": "i32", "DST_HEAD": "i32"}
    const = dict(SCALED=kind != "bf16", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                 GROUP=128 if kind == "int4" else 0, EVEN_K=True, SWIGLU=False, RESIDUAL=False, MAGIC=0x4300,
                 BIAS=128.0, DEQ=lt._DEQUANT_INT4 if kind == "int4" and block_k >= 64 else None,
                 I8F16=lt._I8_TO_F16 if f16 else None, X_SCALE=2.0 ** lt.X_SHIFT if f16 else 1.0,
                 XPERM=xperm, TILES=16 if xperm else 0, DIGITS=digits)
    const.update(epilogue)
    if tma:
        block = [2, block_n // 2, block_k] if const["SWIGLU"] else [block_n, block_k]  # run_linear's descriptor
        sig["W"] = f"tensordesc<{sig['W'][1:]}[{', '.join(map(str, block))}]>"
        const["TMA"] = True
    sig.update({k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in (*range(11), 12, 13, 14)  # the pointers, N, K, CHUNK: not M
             if not (tma and i == 1)}
    return triton.compile(ASTSource(lt._linear_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def compile_context(tma: bool, block_r: int, block_n: int, D: int, stages: int, warps: int, hkv: int = 32):
    # bifurcated_triton._context_own_kernel on one context of 8K keys in 8 splits, and the own slots apart (P_OWN);
    # tma: the level's whole blocks of keys and values through (BLOCK_N, D) descriptors (bifurcated_triton.Tiles.tma)
    kv = f"tensordesc<bf16[{block_n}, {D}]>" if tma else "*bf16"
    sig = dict(Q="*bf16", K="*bf16", V="*bf16", Lens="*i64", KD="*bf16", VD="*bf16", Slot="*i64", O_part="*bf16",
               L_part="*fp32", R="i32", G="i32", M="i32", T="i32", R_ALL="i32", SPLIT0="i32", SPLIT_OWN="i32",
               START="i32", Freqs="*fp32", F_ROW="i32", ROW_Q="i32", KN="*bf16", VN="*bf16", ROW_KV="i32", KT=kv, VT=kv)
    # as a launch specializes them: pointers 16-byte aligned, sizes that are multiples of 16
    aligned = [i for i, (k, t) in enumerate(sig.items()) if t[0] == "*" or k in ("R", "M", "T", "R_ALL", "START")]
    const = dict(ROW_BLOCKS=1, P=8, GROUPS=1, P_OWN=1, QK_SCALE=bt.qk_scale(D), HKV=hkv, D=D, CHUNK=1024,
                 BLOCK_R=block_r, CHUNK_OWN=128, BLOCK_G=16, BLOCK_N=block_n, LENGTHS=False, ROPE=False, TMA=tma)
    sig.update({k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return triton.compile(ASTSource(bt._context_own_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def main(kind: str, block_m: int, block_n: int, block_k: int, stages: int, warps: int = 4):
    if kind == "gemv":
        k = compile_gemv(block_n, block_k, stages, warps)
    elif kind.startswith("context"):
        k = compile_context(kind == "context-tma", block_m, block_n, block_k, stages, warps)
    else:
        k = compile_linear(kind, block_m, block_n, block_k, stages, warps)
    kind = VARIANTS.get(kind, kind)
    cubin, ptx = Path(f"/tmp/sass_loop_{os.getpid()}.cubin"), Path(f"/tmp/sass_loop_{os.getpid()}.ptx")
    cubin.write_bytes(k.asm["cubin"])
    ptx.write_text(k.asm["ptx"])
    tools = Path(triton.__file__).parent / "backends/nvidia/bin"
    sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    # ptxas's own account: registers, and whether it serialized the wgmma products (C7515: each waits for the last)
    info = subprocess.run([str(tools / "ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", "/dev/null"],
                          capture_output=True, text=True).stderr
    cubin.unlink()
    ptx.unlink()
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    # (context: a block's keys and values, D = block_k)
    tile_bytes = block_n * block_k * {"bf16": 2, "int8": 1, "int4": 0.5, "gemv": 0.5, "context": 4}[kind]
    what = "key and value" if kind == "context" else "weight"
    print(f"{kind} BLOCK_M={block_m} BLOCK_N={block_n} BLOCK_K={block_k} stages={stages} warps={warps}: "
          f"{len(ins)} instructions, shared memory {k.metadata.shared} B, {tile_bytes:.0f} {what} bytes per K tile")
    for line in info.splitlines():
        if "C75" in line or "registers" in line:
            print("  ptxas:", line.removeprefix("ptxas info    : "))
    for addr, text in ins:
        target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:  # a backward branch: a loop
            lo = int(target.group(1), 16)
            body = [t for a, t in ins if lo <= a <= addr]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            print(f"  loop {lo:#x}-{addr:#x}: {len(body)} instructions per thread per K tile, "
                  f"{len(body) * warps / tile_bytes:.3f} warp instructions per weight byte:",
                  ", ".join(f"{op} {c}" for op, c in ops.most_common(16)))


if __name__ == "__main__":
    kinds = ("bf16", "int8", "int4", "gemv", "context", *VARIANTS)
    if len(sys.argv) not in (6, 7) or sys.argv[1] not in kinds:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(kinds)} BLOCK_M BLOCK_N BLOCK_K STAGES [WARPS]")
    main(sys.argv[1], *map(int, sys.argv[2:]))
