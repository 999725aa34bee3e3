# Convert a Hugging Face Llama-family checkpoint (config.json + *.safetensors or
# pytorch_model*.bin) into this project's format: one model.safetensors with Meta's parameter
# names, fused wqkv and w13, q/k rows permuted to Meta's interleaved RoPE layout, and the ModelArgs
# recorded in the file's metadata; tokenizer.model is copied beside it when there is one.
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `from model import ...` as a script

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from checkpoint import CHECKPOINT_FILE
from model import ModelArgs

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Hugging Face names, within one layer, mapped to Meta's (q, k, v and gate, up are fused separately)
LAYER_NAMES = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def permute_rope(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    # Hugging Face rotates dims (i, i + D/2) of each head together ("rotate_half"); Meta's layout,
    # which model.apply_rotary_emb uses, rotates (2i, 2i + 1). Reordering the output rows of wq
    # and wk gives the same attention scores, since q.k is a sum over dims in any order as long
    # as q and k are reordered alike. Row h D + 2i + j of the result is row h D + j D/2 + i of w.
    C = w.shape[1]
    return (w.view(n_heads, 2, head_dim // 2, C)  # (heads, 2, D/2, C)
             .transpose(1, 2)  # (heads, D/2, 2, C)
             .reshape(n_heads * head_dim, C))  # (heads D, C)


class _Weights:
    """Every tensor of a Hugging Face checkpoint by name, read lazily from its file."""

    def __init__(self, checkpoint_dir: Path):
        self.files = self._find_files(checkpoint_dir)
        self.where: dict[str, Path] = {}
        self._bins: dict[Path, dict] = {}
        for f in self.files:
            if f.suffix == ".safetensors":
                with safe_open(f, "pt") as sf:
                    names = list(sf.keys())
            else:  # mmap: a 70B .bin is read a tensor at a time, not all at once
                self._bins[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
                names = list(self._bins[f])
            for name in names:
                self.where[name] = f

    @staticmethod
    def _find_files(d: Path) -> list[Path]:
        for index, pattern in (("model.safetensors.index.json", "*.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
            if (d / index).is_file():
                files = sorted({d / f for f in json.loads((d / index).read_text())["weight_map"].values()})
                for f in files:
                    if not f.is_file():
                        raise FileNotFoundError(f"{d / index} lists {f.name}, which is missing")
                return files
            # skip files this converter wrote: converting into the same directory twice must not
            # read Meta-named tensors back as Hugging Face ones
            files = [f for f in sorted(d.glob(pattern)) if not _is_converted(f)]
            if files:
                return files
        raise FileNotFoundError(f"no Hugging Face weights (*.safetensors or pytorch_model*.bin) in {d}")

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        if f in self._bins:
            return self._bins[f][name]
        with safe_open(f, "pt") as sf:
            return sf.get_tensor(name)


def _is_converted(f: Path) -> bool:
    if f.suffix != ".safetensors":
        return False
    with safe_open(f, "pt") as sf:
        return "config" in (sf.metadata() or {})


def _expected_shapes(args: ModelArgs, tied: bool) -> dict[str, tuple]:
    C, F, V = args.dim, args.intermediate_size, args.vocab_size
    HD, KD = args.n_head * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    if not tied:
        shapes["lm_head.weight"] = (V, C)
    per_layer = {
        "self_attn.q_proj.weight": (HD, C), "self_attn.k_proj.weight": (KD, C),
        "self_attn.v_proj.weight": (KD, C), "self_attn.o_proj.weight": (C, HD),
        "mlp.gate_proj.weight": (F, C), "mlp.up_proj.weight": (F, C), "mlp.down_proj.weight": (C, F),
        "input_layernorm.weight": (C,), "post_attention_layernorm.weight": (C,),
    }
    for i in range(args.n_layer):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


def _check_keys(weights: _Weights, expected: dict[str, tuple], tied: bool, checkpoint_dir: Path):
    missing = [k for k in expected if k not in weights.where]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"missing tensor {missing[0]}{more} in {checkpoint_dir}")
    # older checkpoints store RoPE's inv_freq buffers, and tied ones sometimes lm_head too
    extra = [k for k in weights.where if k not in expected and not k.endswith("rotary_emb.inv_freq")
             and not (tied and k == "lm_head.weight")]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(f"unexpected tensor {extra[0]}{more} in {checkpoint_dir}; not a plain Llama checkpoint?")


def _find_tokenizer(checkpoint_dir: Path) -> Optional[Path]:
    # Llama-2 repos keep the sentencepiece model at the top; Llama-3 keep the tiktoken file in original/
    for candidate in (checkpoint_dir / "tokenizer.model", checkpoint_dir / "original" / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def _atomic_copy(src: Path, dst: Path):
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def convert(checkpoint_dir, output_dir=None, dtype: Optional[str] = None) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    output_dir = Path(output_dir) if output_dir is not None else checkpoint_dir
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {checkpoint_dir}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    try:
        hf_config = json.loads((checkpoint_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{checkpoint_dir / 'config.json'} is not valid JSON: {e}") from None
    try:
        args = ModelArgs.from_hf_config(hf_config)
    except KeyError as e:
        raise ValueError(f"config.json lacks {e.args[0]!r}") from None
    tied = bool(hf_config.get("tie_word_embeddings", False))

    weights = _Weights(checkpoint_dir)
    out_path = output_dir / CHECKPOINT_FILE
    print(f"reading {len(weights.files)} file(s) from {checkpoint_dir}")
    expected = _expected_shapes(args, tied)
    _check_keys(weights, expected, tied, checkpoint_dir)
    to = DTYPES[dtype] if dtype is not None else None

    def get(name: str) -> torch.Tensor:
        t = weights.get(name)
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, config.json implies {expected[name]}")
        return t.to(to) if to is not None else t

    out: dict[str, torch.Tensor] = {"tok_embeddings.weight": get("model.embed_tokens.weight")}  # (V, C)
    for i in range(args.n_layer):
        p = f"model.layers.{i}."
        wq = permute_rope(get(p + "self_attn.q_proj.weight"), args.n_head, args.head_dim)  # (H D, C)
        wk = permute_rope(get(p + "self_attn.k_proj.weight"), args.n_kv_heads, args.head_dim)  # (Hkv D, C)
        wv = get(p + "self_attn.v_proj.weight")  # (Hkv D, C)
        out[f"layers.{i}.attention.wqkv.weight"] = torch.cat([wq, wk, wv], dim=0)  # ((H + 2 Hkv) D, C)
        gate_up = [get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]  # (F, C) each
        out[f"layers.{i}.feed_forward.w13.weight"] = torch.cat(gate_up, dim=0)  # (2F, C)
        for hf_name, meta_name in LAYER_NAMES.items():
            out[f"layers.{i}.{meta_name}"] = get(p + hf_name)
    out["norm.weight"] = get("model.norm.weight")  # (C,)
    # a tied model's head is its embedding; store a copy so the file loads like an untied one
    out["output.weight"] = out["tok_embeddings.weight"].clone() if tied else get("lm_head.weight")  # (V, C)
    out = {k: v.contiguous() for k, v in out.items()}

    output_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output_dir, prefix=f".{CHECKPOINT_FILE}.", suffix=".tmp")
    os.close(fd)
    try:  # write beside the target, then rename: a crash never leaves a half-written checkpoint
        save_file(out, tmp, metadata={"format": "pt", "config": args.to_json()})
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

    tokenizer = _find_tokenizer(checkpoint_dir)
    if tokenizer is not None and tokenizer.resolve() != (output_dir / "tokenizer.model").resolve():
        _atomic_copy(tokenizer, output_dir / "tokenizer.model")
    n_params = sum(t.numel() for name, t in out.items() if not (tied and name == "output.weight"))
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in out.values()})
    print(f"converted {args.n_layer} layers ({n_params / 1e6:.1f}M parameters, {', '.join(dtypes)})"
          f" -> {out_path} ({out_path.stat().st_size / 2**20:.1f} MiB)")
    print(f"tokenizer: {output_dir / 'tokenizer.model'}" if tokenizer is not None
          else f"tokenizer: none found in {checkpoint_dir} (no tokenizer.model or original/tokenizer.model)")
    return out_path


def main(checkpoint_dir: str, output_dir: Optional[str], dtype: Optional[str]):
    convert(checkpoint_dir, output_dir, dtype)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Convert a Hugging Face Llama checkpoint to this project's format.")
    parser.add_argument("--checkpoint_dir", required=True, help="directory with config.json and the weights")
    parser.add_argument("--output_dir", default=None, help="where model.safetensors goes (default: checkpoint_dir)")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="cast the weights (default: keep)")
    try:
        main(**vars(parser.parse_args()))
    except (ValueError, OSError, SafetensorError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
