# Weight-only quantization, applied to a loaded plain model by swapping its linear layers.
# Decode reads every weight once per step and is memory-bound, so 1 byte (int8) or half a byte
# (int4) per weight instead of 2 is the speed-up; activations stay in the model dtype.
#   int8: symmetric, one scale per output channel.
#   int4: asymmetric, a scale and a zero point per group of G input channels, values 0..15.
# Quantized: every linear layer of the transformer blocks. Kept as they are (bf16 in the file):
# the embedding, the norms and the output head (the logits decide sampling and --rerank, and
# generate.py reads the run's device and dtype from the head's weight).
#
#   python quantize.py --checkpoint_path DIR --mode int4 --groupsize 128
#   python generate.py --checkpoint_path DIR/converted.int4-g128.safetensors --prompt "def f("
#
# The file records {"mode", "groupsize"} in its metadata; checkpoint.load_model swaps the layers by
# that (never by the file name) before loading the weights.
#
# Dimension letters: N output channels, K input channels, G group size.
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from checkpoint import CHECKPOINT_FILE, check_state_dict, fast_linears, read_tensors
from model import ModelArgs, Transformer, swiglu

try:  # the fused w8a16 / w4a16 Triton kernels for CUDA; CPU-only installs have no Triton
    import linear_triton
    from linear_triton import forward_linear as triton_linear
except ImportError:
    triton_linear = linear_triton = None

MODES = ("int8", "int4")
GROUPSIZES = (32, 64, 128, 256)  # powers of two: whole tiles of the Triton kernels (linear_triton.py)
DEFAULT_GROUPSIZE = 128
TINYGEMM_ROWS = 4  # int4 on CUDA: up to this many rows, PyTorch's int4 kernel; more, the Triton one


def check_mode(mode: str, groupsize: Optional[int]) -> Optional[int]:
    """The group size to use: None for int8, DEFAULT_GROUPSIZE for int4 if none is given."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; known: {', '.join(MODES)}")
    if mode == "int8":
        if groupsize is not None:
            raise ValueError("groupsize applies to int4 only (int8 has one scale per output channel)")
        return None
    groupsize = DEFAULT_GROUPSIZE if groupsize is None else groupsize
    if groupsize not in GROUPSIZES:
        raise ValueError(f"groupsize must be one of {', '.join(map(str, GROUPSIZES))}, got {groupsize}")
    return groupsize


def check_shape(name: str, out_features: int, in_features: int, mode: str, groupsize: Optional[int]):
    if mode != "int4":
        return
    if in_features % groupsize:
        raise ValueError(f"groupsize {groupsize} does not divide the input dimension {in_features} of {name}")


# ---------------------------------------------------------------------------------------------
# The math, on one (N, K) weight
def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) float -> int8 (N, K) and bf16 scales (N,); w ~ q * scale."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).to(torch.bfloat16)  # (N,)
    # quantize against the stored (bf16) scale, so the error is at most scale / 2
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor) -> Tensor:
    return q.float() * scales.float()[:, None]  # (N, K)


def pack_int4(q: Tensor) -> Tensor:
    # (N, K) values 0..15 -> (N, K/2) uint8: input channel 2i in the high nibble, 2i+1 in the low
    # one, the order torch._convert_weight_to_int4pack reads (see the comment in its int4mm.cu).
    q = q.to(torch.uint8)
    return q[:, ::2] << 4 | q[:, 1::2]  # (N, K/2)


def unpack_int4(packed: Tensor) -> Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(1)  # (N, K/2, 2) -> (N, K)


def quantize_int4(w: Tensor, groupsize: int) -> tuple[Tensor, Tensor]:
    """(N, K) float -> packed uint8 (N, K/2) and bf16 scales_and_zeros (K/G, N, 2).
    The convention of torch's int4 kernels: w ~ (q - 8) * scale + zero, q in 0..15, so the
    zero point is min + 8 * scale (not an integer offset)."""
    N, K = w.shape
    wg = w.float().reshape(N, K // groupsize, groupsize)  # (N, K/G, G)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, K/G)
    scales = (hi - lo).clamp(min=1e-6) / 15
    sz = torch.stack([scales, lo + 8 * scales], dim=-1).to(torch.bfloat16)  # (N, K/G, 2)
    s, z = sz.float().unbind(-1)  # (N, K/G) each; quantize against the stored (bf16) grid
    q = torch.round((wg - z[..., None]) / s[..., None] + 8).clamp(0, 15)  # (N, K/G, G)
    return pack_int4(q.reshape(N, K)), sz.transpose(0, 1).contiguous()  # (N, K/2), (K/G, N, 2)


def dequantize_int4(packed: Tensor, scales_and_zeros: Tensor, groupsize: int) -> Tensor:
    q = unpack_int4(packed).float()  # (N, K)
    N, K = q.shape
    s, z = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, K/G) each
    w = (q.view(N, K // groupsize, groupsize) - 8) * s[..., None] + z[..., None]  # (N, K/G, G)
    return w.view(N, K)  # (N, K)


# ---------------------------------------------------------------------------------------------
# The layers that replace nn.Linear. Their buffers are created empty (meta under
# torch.device("meta")) and filled by load_state_dict(assign=True).
class Int8Linear(nn.Module):
    swiglu = False  # the MLP's [gate; up] layer returning silu(gate) * up (set by linear_triton on CUDA)
    adds_residual = False  # forward(x, residual) returns residual + x W^T (set by linear_triton on CUDA)

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))  # (N, K)
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16))  # (N,)

    def take_rows(self, idx: Tensor):  # tensor parallelism (tp.py): these output channels only
        self.weight, self.scales = self.weight.index_select(0, idx), self.scales.index_select(0, idx)

    def take_cols(self, start: int, stop: int):  # the scales are per output channel: all kept
        self.weight = self.weight[:, start:stop].contiguous()

    def kernel_operands(self) -> tuple[Tensor, Tensor, int]:  # linear_triton.run_linear's weight, scales, group
        return self.weight, self.scales, 0

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if triton_linear is not None and x.is_cuda:  # one Triton kernel: 1 byte read per weight
            return triton_linear(x, self.weight, self.scales, swiglu=self.swiglu, residual=residual)
        # the per-channel scale commutes with the matmul
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return epilogue(y, self.swiglu, residual)


class Int4Linear(nn.Module):
    swiglu = adds_residual = False  # as Int8Linear's
    pairs_out = False  # with swiglu, at one row: the output as the next int4 layer's x pairs (linear_triton)

    def __init__(self, in_features: int, out_features: int, groupsize: int):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.register_buffer("tinygemm", None, persistent=False)  # pack_for_cuda: PyTorch's int4 layout
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))  # (N, K/2)
        self.register_buffer("scales_and_zeros", torch.empty(in_features // groupsize, out_features, 2,
                                                             dtype=torch.bfloat16))  # (K/G, N, 2)

    # tensor parallelism (tp.py)
    def take_rows(self, idx: Tensor):
        self.weight = self.weight.index_select(0, idx)  # (N_local, K/2)
        self.scales_and_zeros = self.scales_and_zeros.index_select(1, idx)  # (K/G, N_local, 2)
        self.tinygemm = None  # a copy of the whole weight no longer: pack_for_cuda again

    def take_cols(self, start: int, stop: int):
        if start % self.groupsize or stop % self.groupsize:
            raise ValueError(f"tensor parallelism splits {self.in_features} input channels at {start}..{stop}, "
                             f"not a multiple of the int4 groupsize {self.groupsize}")
        self.weight = self.weight[:, start // 2 : stop // 2].contiguous()  # (N, K_local/2)
        G = self.groupsize
        self.scales_and_zeros = self.scales_and_zeros[start // G : stop // G].contiguous()  # (K_local/G, N, 2)
        self.tinygemm = None

    def pack_for_cuda(self):
        """Also keep the weight in the layout of PyTorch's int4 kernel (tinygemm), which takes up to
        TINYGEMM_ROWS rows (n = 1 decoding) about twice as fast as the Triton kernel but 32 rows 3-4x
        slower (bench/results/h100-80gb-hbm3/linear.md). Half a byte more per weight on the GPU."""
        inner_k_tiles = next((t for t in (8, 4, 2) if self.in_features % (16 * t) == 0), None)
        if inner_k_tiles is not None and self.out_features % 8 == 0:
            self.tinygemm = torch._convert_weight_to_int4pack(self.weight.contiguous(), inner_k_tiles)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        rows = x.numel() // self.in_features
        if (self.tinygemm is not None and x.is_cuda and x.dtype == torch.bfloat16
                and (linear_triton.GEMV_ROWS if linear_triton else 0) < rows <= TINYGEMM_ROWS):  # fewer: Triton's GEMV
            y = torch._weight_int4pack_mm(x.reshape(rows, -1), self.tinygemm, self.groupsize, self.scales_and_zeros)
            return epilogue(y.reshape(*x.shape[:-1], self.out_features), self.swiglu, residual)
        if triton_linear is not None and x.is_cuda:  # one Triton kernel: half a byte read per weight
            return triton_linear(x, self.weight, self.scales_and_zeros, self.groupsize, swiglu=self.swiglu,
                                 residual=residual, pairs=self.pairs_out)
        y = F.linear(x, dequantize_int4(self.weight, self.scales_and_zeros, self.groupsize).to(x.dtype))
        return epilogue(y, self.swiglu, residual)


def epilogue(y: Tensor, activate: bool, residual: Optional[Tensor]) -> Tensor:
    # what the Triton kernel's epilogue does, for the other paths: the activation, or the residual add
    y = swiglu(y) if activate else y
    return y if residual is None else residual + y


def swap_linears(model: Transformer, mode: str, groupsize: Optional[int] = None) -> Transformer:
    """Replace every nn.Linear of the transformer blocks by an empty Int8Linear / Int4Linear."""
    groupsize = check_mode(mode, groupsize)
    for name, linear in list(model.layers.named_modules()):
        if isinstance(linear, nn.Linear):
            check_shape(f"layers.{name}", linear.out_features, linear.in_features, mode, groupsize)
            parent, _, child = name.rpartition(".")
            new = (Int8Linear(linear.in_features, linear.out_features) if mode == "int8"
                   else Int4Linear(linear.in_features, linear.out_features, groupsize))
            setattr(model.layers.get_submodule(parent), child, new)
    return model


def quantize_model(model: Transformer, mode: str, groupsize: Optional[int] = None) -> Transformer:
    """A loaded plain model -> a quantized copy on the same device (scripts/benchmark.py on random weights)."""
    state = quantize_state_dict(model, mode, groupsize)
    dtype = model.output.weight.dtype
    with torch.device("meta"):
        quantized = swap_linears(Transformer(model.config), mode, groupsize)
    quantized.load_state_dict({k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}, assign=True)
    fast_linears(quantized)  # the output head, as checkpoint.load_model has it
    return quantized.eval()


def is_quantized(name: str, t: Tensor) -> bool:
    # the nn.Linear weights of the blocks: the only 2-D tensors under layers. (norms are 1-D)
    return name.startswith("layers.") and name.endswith(".weight") and t.dim() == 2


def quantize_state_dict(model_or_state: Union[nn.Module, dict], mode: str, groupsize: Optional[int] = None) -> dict:
    """A plain model's weights -> the state dict of the model after swap_linears(mode, groupsize);
    everything not quantized in bf16."""
    groupsize = check_mode(mode, groupsize)
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    for name, t in state.items():  # every shape first: fail before any work
        if is_quantized(name, t):
            check_shape(name.removesuffix(".weight"), t.shape[0], t.shape[1], mode, groupsize)
    out = {}
    for name, t in state.items():
        if not is_quantized(name, t):
            out[name] = t.to(torch.bfloat16).contiguous()
        elif mode == "int8":
            out[name], out[name.removesuffix("weight") + "scales"] = quantize_int8(t)
        else:
            out[name], out[name.removesuffix("weight") + "scales_and_zeros"] = quantize_int4(t, groupsize)
    return out


# ---------------------------------------------------------------------------------------------
# CLI: a converted checkpoint -> a quantized one beside it
def read_checkpoint(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "quantization" in meta:
                raise ValueError(f"checkpoint {path} is already quantized ({meta['quantization']}); "
                                 "quantize the original")
            if "config" not in meta:
                raise ValueError(f"checkpoint {path} records no config; convert it with scripts/convert_hf_checkpoint.py")
            config = ModelArgs.from_json(meta["config"])
            state = read_tensors(f)  # in the file's own dtypes
    except (SafetensorError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None
    with torch.device("meta"):
        check_state_dict(Transformer(config), state, path)
    return meta, state


def write_atomic(path: Path, state: dict, metadata: dict):
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(checkpoint_path: str, mode: str, groupsize: Optional[int]) -> Path:
    groupsize = check_mode(mode, groupsize)
    src = Path(checkpoint_path)
    if src.is_dir():
        src = src / CHECKPOINT_FILE
    if not src.is_file():
        raise ValueError(f"checkpoint not found: {src}")
    meta, state = read_checkpoint(src)
    out = quantize_state_dict(state, mode, groupsize)
    spec = {"mode": mode} if mode == "int8" else {"mode": mode, "groupsize": groupsize}
    tag = mode if mode == "int8" else f"{mode}-g{groupsize}"
    dst = src.with_name(f"{src.stem}.{tag}.safetensors")
    write_atomic(dst, out, dict(meta, quantization=json.dumps(spec)))
    n = sum(is_quantized(k, t) for k, t in state.items())
    before, after = src.stat().st_size, dst.stat().st_size
    print(f"quantized {n} linear layers to {tag}; embedding, norms and output head kept in bf16")
    print(f"wrote {dst}")
    print(f"size {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({after / before:.2f}x)")
    return dst


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Weight-only int8 / int4 quantization of a converted checkpoint.")
    p.add_argument("--checkpoint_path", required=True, help="converted checkpoint (file or directory)")
    p.add_argument("--mode", required=True, help="int8 or int4")
    p.add_argument("--groupsize", type=int, default=None,
                   help=f"int4: input channels per scale and zero point, one of {GROUPSIZES} (default {DEFAULT_GROUPSIZE})")
    args = p.parse_args()
    try:
        main(**vars(args))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
