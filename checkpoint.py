# Loading a model: a converted checkpoint (the file or its directory, config in its metadata,
# tokenizer beside it, quantized layers swapped in by the metadata), or random weights of a named
# config (`synthetic:NAME`); with a `prepare` step (tensor parallelism) applied before the weights
# reach the device.
import json
from pathlib import Path
from typing import Callable, Optional

import torch

from model import ModelArgs, Transformer
from tokenizer import Tokenizer, load_tokenizer

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "models" / "tiny-code"  # trained by scripts/train_tiny.py
CHECKPOINT_FILE = "converted.safetensors"  # named apart from Hugging Face's model.safetensors
TOKENIZER_FILE = "tokenizer.model"


def resolve_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r} is not available (CUDA devices: {torch.cuda.device_count()})")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported (cpu, cuda)")
    return dev


def resolve_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"unknown dtype {dtype!r}; known: bfloat16, float16, float32")
    return getattr(torch, dtype)


def load_model(checkpoint_path: str, device="cpu", dtype=torch.float32,
               prepare: Optional[Callable[[Transformer], Transformer]] = None) -> tuple[Transformer, Optional[Tokenizer]]:
    """A converted checkpoint (file or directory), or `synthetic:NAME` for random weights of a
    named config. Returns the model in eval mode and the tokenizer beside the checkpoint (or None).
    prepare: applied before the weights reach `device` (tp.apply_tp: each GPU gets only its shard)."""
    device = torch.device(device)
    if checkpoint_path.startswith("synthetic:"):
        return synthetic_model(checkpoint_path.split(":", 1)[1], device, dtype, prepare), None
    path = Path(checkpoint_path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device if prepare is None else "cpu")) as f:
            meta = f.metadata() or {}
            if "config" not in meta:
                raise ValueError(f"checkpoint {path} records no config; convert it with scripts/convert_hf_checkpoint.py")
            config = ModelArgs.from_json(meta["config"])
            state = read_tensors(f)
    except (SafetensorError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None
    with torch.device("meta"):
        model = Transformer(config)
        if "quantization" in meta:  # written by quantize.py (imported here: it imports this file)
            import quantize

            quantize.swap_linears(model, **json.loads(meta["quantization"]))
    check_state_dict(model, state, path)
    # quantized weights keep their integer dtypes; scales and all else follow the model dtype
    model.load_state_dict({k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}, assign=True)
    if prepare is not None:
        model = prepare(model).to(device)
    fast_linears(model)
    tok_path = path.parent / TOKENIZER_FILE
    tokenizer = load_tokenizer(tok_path) if tok_path.exists() else None
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens, the model only {config.vocab_size}")
    return model.eval(), tokenizer


def read_tensors(f) -> dict:
    """Every tensor of an open safetensors file. Files written before the MLP's gate and up
    projections were fused keep them apart as w1 and w3: joined here into w13 (quantized ones with
    their scales, whose output channels are dim 1 in int4's (K/G, N, 2) scales_and_zeros)."""
    state = {k: f.get_tensor(k) for k in f.keys()}
    for name in [k for k in state if ".feed_forward.w1." in k]:
        dim = 1 if name.endswith("scales_and_zeros") else 0
        state[name.replace(".w1.", ".w13.")] = torch.cat([state.pop(name), state.pop(name.replace(".w1.", ".w3."))], dim)
    return state


def fast_linears(model: Transformer):
    # on CUDA, the bf16 layers' decode rows and the norms go to Triton kernels (linear_triton.use_kernels), and
    # int4 layers also keep their weight for PyTorch's kernel (quantize.Int4Linear.pack_for_cuda)
    if model.output.weight.is_cuda:
        from linear_triton import use_kernels

        use_kernels(model)
        for module in model.modules():
            if hasattr(module, "pack_for_cuda"):
                module.pack_for_cuda()


def check_state_dict(model: Transformer, state: dict, path: Path):
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"checkpoint {path} does not match its config: {k} has shape "
                             f"{tuple(state[k].shape)}, config expects {shape}")


def synthetic_model(name: str, device: torch.device, dtype: torch.dtype,
                    prepare: Optional[Callable[[Transformer], Transformer]] = None) -> Transformer:
    # Random weights have no trained length, so the length limit is lifted to what the run asks.
    config = ModelArgs.from_name(name)
    config.block_size = 1 << 30
    with torch.device("meta"):
        model = Transformer(config)
    if prepare is not None:  # on shapes alone: no rank ever holds the whole model
        model = prepare(model)
    model = model.to_empty(device=device).to(dtype)
    # the same draws in the same order on every rank: replicated weights come out identical
    gen = torch.Generator(device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        else:  # normal(0, 0.02), never zeros: zeros run faster than real weights
            torch.nn.init.normal_(p, 0.0, 0.02, generator=gen)
    fast_linears(model)
    return model.eval()
