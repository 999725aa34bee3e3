# A Llama-family decoder in plain PyTorch: RMSNorm, SwiGLU, RoPE (with Llama-3.1 frequency
# scaling), MHA / GQA / MQA. It knows nothing of sampling, parallelism or quantization:
# attention hands q, k, v and the positions' rotation to its cache object, which applies RoPE as it
# stores them (on the GPU, one kernel for both), and gets the attention output back.
#
# Dimension letters used in shape comments:
#   B batch (1 in prefill, n samples in decode)   S tokens in this call   V vocabulary
#   C model width (dim)   H query heads   Hkv key/value heads   D head dim   F MLP width
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass
class ModelArgs:
    block_size: int = 2048  # the longest sequence (prompt + new tokens) the model was trained for
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: Optional[int] = None
    n_kv_heads: Optional[int] = None  # None: same as n_head (MHA); 1 is MQA
    head_dim: Optional[int] = None  # None: dim // n_head
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    rope_scaling: Optional[dict] = None  # Llama-3.1: factor, low/high_freq_factor, original_max_position_embeddings

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_head
        if self.head_dim is None:
            if self.dim % self.n_head:
                raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
            self.head_dim = self.dim // self.n_head
        if self.intermediate_size is None:  # Meta's rule: 2/3 of 4 * dim, rounded up to 256
            self.intermediate_size = find_multiple(int(2 * 4 * self.dim / 3), 256)
        if self.n_head % self.n_kv_heads:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in CONFIGS:
            raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
        return cls(**CONFIGS[name])

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        if cfg.get("model_type") not in ("llama", "mistral"):
            raise ValueError(f"model_type {cfg.get('model_type')!r} is not a Llama-family model")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ValueError(f"{flag}=true is not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
        if cfg.get("sliding_window") and cfg["sliding_window"] < cfg.get("max_position_embeddings", 0):
            raise ValueError(f"sliding-window attention ({cfg['sliding_window']}) is not supported")
        # transformers >= 5 nests rope settings in rope_parameters; older files use rope_theta + rope_scaling
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        base = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope type {rope_type!r} is not supported (default, llama3)")
        return cls(
            block_size=cfg["max_position_embeddings"],
            vocab_size=cfg["vocab_size"],
            n_layer=cfg["num_hidden_layers"],
            n_head=cfg["num_attention_heads"],
            dim=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            rope_base=float(base),
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_scaling=rope if rope_type == "llama3" else None,
        )

    @classmethod
    def from_json(cls, text: str) -> "ModelArgs":
        d = json.loads(text)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


_LLAMA31_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
CONFIGS = {
    "Llama-2-7B": dict(block_size=4096, n_layer=32, n_head=32, dim=4096, intermediate_size=11008),
    "Llama-2-13B": dict(block_size=4096, n_layer=40, n_head=40, dim=5120, intermediate_size=13824),
    "Llama-2-70B": dict(block_size=4096, n_layer=80, n_head=64, n_kv_heads=8, dim=8192, intermediate_size=28672),
    "CodeLlama-7B": dict(block_size=16384, vocab_size=32016, n_layer=32, n_head=32, dim=4096,
                         intermediate_size=11008, rope_base=1e6),
    "CodeLlama-13B": dict(block_size=16384, vocab_size=32016, n_layer=40, n_head=40, dim=5120,
                          intermediate_size=13824, rope_base=1e6),
    "CodeLlama-34B": dict(block_size=16384, n_layer=48, n_head=64, n_kv_heads=8, dim=8192,
                          intermediate_size=22016, rope_base=1e6),
    "Llama-3-8B": dict(block_size=8192, vocab_size=128256, n_layer=32, n_head=32, n_kv_heads=8, dim=4096,
                       intermediate_size=14336, rope_base=500000.0),
    "Llama-3-70B": dict(block_size=8192, vocab_size=128256, n_layer=80, n_head=64, n_kv_heads=8, dim=8192,
                        intermediate_size=28672, rope_base=500000.0),
    "Llama-3.1-8B": dict(block_size=131072, vocab_size=128256, n_layer=32, n_head=32, n_kv_heads=8, dim=4096,
                         intermediate_size=14336, rope_base=500000.0, rope_scaling=_LLAMA31_ROPE),
    "Llama-3.1-70B": dict(block_size=131072, vocab_size=128256, n_layer=80, n_head=64, n_kv_heads=8, dim=8192,
                          intermediate_size=28672, rope_base=500000.0, rope_scaling=_LLAMA31_ROPE),
    "Mistral-7B": dict(block_size=32768, vocab_size=32768, n_layer=32, n_head=32, n_kv_heads=8, dim=4096,
                       intermediate_size=14336, rope_base=1e6),
    # tiny shapes for tests and quick CPU runs
    "tiny-mha": dict(block_size=512, vocab_size=512, n_layer=2, n_head=4, dim=64, intermediate_size=176),
    "tiny-gqa": dict(block_size=512, vocab_size=512, n_layer=2, n_head=4, n_kv_heads=2, dim=64,
                     intermediate_size=176),
    "tiny-mqa": dict(block_size=512, vocab_size=512, n_layer=2, n_head=4, n_kv_heads=1, dim=64,
                     intermediate_size=176),
}


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)  # (V, C)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)  # (V, C)
        self.freqs_cis: Optional[Tensor] = None  # (max_seq_len, D/2, 2), built by setup()

    def setup(self, max_seq_len: int, caches: Optional[list] = None):
        """Build the RoPE table for max_seq_len positions and give each layer its cache
        (None: no cache, plain causal attention over the tokens of each call)."""
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"got {len(caches)} caches for {len(self.layers)} layers")
        device = self.output.weight.device
        self.freqs_cis = precompute_freqs_cis(max_seq_len, self.config.head_dim, self.config.rope_base,
                                              self.config.rope_scaling, device)
        for i, layer in enumerate(self.layers):
            layer.attention.kv_cache = caches[i] if caches is not None else CausalAttention()

    def forward(self, idx: Tensor, input_pos: Tensor, last_only: bool = False) -> Tensor:
        # idx (B, S) token ids. input_pos: (S,) the positions of a prompt's tokens (prefill, or
        # the whole sequence without a cache), () the one position of a decode step, or (B, 1)
        # each row's own position in a decode step (several prompts of different lengths).
        # last_only: logits of the last position alone (a long prompt's (S, V) logits are GBs).
        x = self.hidden(idx, input_pos)  # (B, S, C)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.output(self.norm(x))  # (B, S, V)

    def hidden(self, idx: Tensor, input_pos: Tensor, run_layer: Optional[Callable] = None) -> Tensor:
        """The residual stream after the last layer, before the final norm: (B, S, C). With run_layer,
        run_layer(layer, x, freqs_cis, input_pos) runs each layer (compiled.py: one compiled graph
        that serves every layer)."""
        if self.freqs_cis is None:
            raise RuntimeError("call model.setup(max_seq_len) before running the model")
        freqs_cis = self.freqs_cis[input_pos.view(-1) if input_pos.dim() < 2 else input_pos]  # ([B,] S, D/2, 2)
        x = self.tok_embeddings(idx)  # (B, S, C)
        for layer in self.layers:
            x = layer(x, freqs_cis, input_pos) if run_layer is None else run_layer(layer, x, freqs_cis, input_pos)
        return x


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, freqs_cis: Tensor, input_pos: Tensor) -> Tensor:
        h = self.attention(self.attention_norm(x), freqs_cis, input_pos, residual=x)  # x + attention
        return self.feed_forward(self.ffn_norm(h), residual=h)  # h + feed-forward


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = config.n_head, config.n_kv_heads, config.head_dim
        # q, k and v in one matrix: one GEMM per step instead of three
        qkv_dim = (config.n_head + 2 * config.n_kv_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_dim, bias=False)  # ((H + 2 Hkv) D, C)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)  # (C, H D)
        self.kv_cache: nn.Module = CausalAttention()

    def forward(self, x: Tensor, freqs_cis: Tensor, input_pos: Tensor, residual: Tensor) -> Tensor:
        B, S, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_heads, self.head_dim
        # a cache whose kernels take the decode step's qkv layer, RoPE and the store in one launch (bifurcated.py)
        step = getattr(self.kv_cache, "qkv_attention", None)
        y = None if step is None else step(self.wqkv, x, freqs_cis, input_pos)  # (B, H, S, D)
        if y is None:
            q, k, v = self.wqkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
            q, k, v = q.view(B, S, H, D), k.view(B, S, Hkv, D), v.view(B, S, Hkv, D)  # before RoPE
            y = self.kv_cache(q, k, v, freqs_cis, input_pos)  # (B, H, S, D)
        y = y.transpose(1, 2).reshape(B, S, H * D)  # (B, S, H D)
        return add_residual(self.wo, y, residual)


class CausalAttention(nn.Module):
    """No cache: causal attention over the tokens of this call alone (the reference path)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor, input_pos: Tensor) -> Tensor:
        return causal_attention(*rotate_heads_first(q, k, v, freqs_cis))


def rotate_heads_first(q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # q (B, S, H, D), k, v (B, S, Hkv, D) -> RoPE on q and k, heads first: (B, H, S, D), (B, Hkv, S, D) x 2
    q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # q (B, H, S, D), k, v (B, Hkv, S, D); SDPA's flash kernel on CUDA
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        # Meta's gate (w1) and up (w3) projections in one matrix, as wqkv: one GEMM per step instead of two
        self.w13 = nn.Linear(config.dim, 2 * config.intermediate_size, bias=False)  # (2F, C): w1 rows, then w3
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)  # (C, F) down

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        h = self.w13(x)
        # a layer with the swiglu flag applies the activation itself (linear_triton: in its kernel)
        return add_residual(self.w2, h if getattr(self.w13, "swiglu", False) else swiglu(h), residual)


def add_residual(layer: nn.Module, x: Tensor, residual: Tensor) -> Tensor:
    # residual + layer(x); a layer with the adds_residual flag takes the residual in (linear_triton:
    # added in its kernel's epilogue)
    if getattr(layer, "adds_residual", False):
        return layer(x, residual)
    return residual + layer(x)


def swiglu(h: Tensor) -> Tensor:
    gate, up = h.chunk(2, dim=-1)  # (..., F) each of (..., 2F)
    return F.silu(gate) * up


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # (C,)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()  # the mean of squares in fp32: bf16 loses too much over thousands of channels
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def precompute_freqs_cis(seq_len: int, head_dim: int, base: float, rope_scaling: Optional[dict],
                         device=None) -> Tensor:
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if rope_scaling is not None:
        freqs = apply_llama31_scaling(freqs, **rope_scaling)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(t, freqs)  # (seq_len, D/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # (seq_len, D/2, 2)


def apply_llama31_scaling(freqs: Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                          original_max_position_embeddings: int) -> Tensor:
    # Llama-3.1 stretches long wavelengths by `factor`, keeps short ones, and blends in between.
    old_len = original_max_position_embeddings
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > old_len / low_freq_factor, freqs / factor, blended)
    return torch.where(wavelen < old_len / high_freq_factor, freqs, scaled)


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    # Meta's layout: dims (2i, 2i+1) of each head form one rotated pair. The converter permutes
    # Hugging Face's q/k weights (which pair i with i + D/2) into this layout.
    B, S, H, D = x.shape
    xs = x.float().reshape(B, S, H, D // 2, 2)  # (B, S, H, D/2, 2)
    fc = freqs_cis.view(-1, S, 1, D // 2, 2)  # (1 or B, S, 1, D/2, 2)
    # eager (the prefill; any uncompiled step): one complex product, 3 kernels where the real form takes 9;
    # compiled code keeps the real form, which Inductor fuses (it does not take complex numbers)
    if not torch.compiler.is_compiling():
        out = torch.view_as_real(torch.view_as_complex(xs) * torch.view_as_complex(fc.float().contiguous()))
        return out.flatten(3).type_as(x)  # (B, S, H, D)
    out = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                       xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], dim=-1)  # (B, S, H, D/2, 2)
    return out.flatten(3).type_as(x)  # (B, S, H, D)
