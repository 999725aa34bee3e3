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

import linear_triton as lt

# a kind of weight on another path: its kind
VARIANTS = {"int8-f16": "int8", "int8-digits": "int8", "int4-xperm": "int4", "bf16-tma": "bf16", "int8-tma": "int8",
            "int8-digits-tma": "int8"}  # -tma: the weight's tiles through a tensor descriptor (linear_triton.Tiles.tma)


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


def main(kind: str, block_m: int, block_n: int, block_k: int, stages: int, warps: int = 4):
    if kind == "gemv":
        k = compile_gemv(block_n, block_k, stages, warps)
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
    tile_bytes = block_n * block_k * {"bf16": 2, "int8": 1, "int4": 0.5, "gemv": 0.5}[kind]
    print(f"{kind} BLOCK_M={block_m} BLOCK_N={block_n} BLOCK_K={block_k} stages={stages} warps={warps}: "
          f"{len(ins)} instructions, shared memory {k.metadata.shared} B, {tile_bytes:.0f} weight bytes per K tile")
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
    kinds = ("bf16", "int8", "int4", "gemv", *VARIANTS)
    if len(sys.argv) not in (6, 7) or sys.argv[1] not in kinds:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(kinds)} BLOCK_M BLOCK_N BLOCK_K STAGES [WARPS]")
    main(sys.argv[1], *map(int, sys.argv[2:]))
