# KV caches for parallel sampling from one prompt, and exact bifurcated attention.
#
# Bifurcated (arXiv 2403.08845): the prompt's keys and values (the context) are stored once per
# layer and read once per decode step for all n samples; each sample keeps only its own decoded
# tokens. Standard: the context is copied into every sample's row, as a plain batched engine
# does; kept as the baseline (`--attention standard`).
#
# Both are the model's attention seam: called with q, k, v and input_pos, they store k and v and
# return the attention output. input_pos is (S,) in prefill (the prompt, batch 1) and () in a
# decode step (one new token for each of the n samples, all at the same position).
#
# Dimension letters: n samples, M context (prompt) length, T decode capacity (max new tokens),
# H query heads, Hkv key/value heads, g = H / Hkv query heads per KV head, D head dim.
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import causal_attention

try:  # the fused Triton kernel for CUDA; CPU-only installs have no Triton and use the reference
    from bifurcated_triton import decode_attention
except ImportError:
    decode_attention = None


class BifurcatedCache(nn.Module):
    def __init__(self, n: int, n_kv_heads: int, head_dim: int, context_len: int, max_new_tokens: int,
                 dtype: torch.dtype):
        super().__init__()
        self.context_len = context_len
        ctx_shape = (n_kv_heads, context_len, head_dim)  # (Hkv, M, D): once, shared by all samples
        dec_shape = (n, n_kv_heads, max_new_tokens, head_dim)  # (n, Hkv, T, D): each sample's own
        self.register_buffer("k_ctx", torch.zeros(ctx_shape, dtype=dtype), persistent=False)
        self.register_buffer("v_ctx", torch.zeros(ctx_shape, dtype=dtype), persistent=False)
        self.register_buffer("k_dec", torch.zeros(dec_shape, dtype=dtype), persistent=False)
        self.register_buffer("v_dec", torch.zeros(dec_shape, dtype=dtype), persistent=False)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
        if input_pos.dim() == 1:  # prefill: q (1, H, M, D), k, v (1, Hkv, M, D)
            check_prefill(q, self.context_len)
            self.k_ctx.copy_(k[0])
            self.v_ctx.copy_(v[0])
            return causal_attention(q, k, v)
        # decode: q (n, H, 1, D), k, v (n, Hkv, 1, D); slot of this step in the decode part
        slot = (input_pos - self.context_len).view(1)  # (1,), a device tensor: no host sync
        self.k_dec.index_copy_(2, slot, k)
        self.v_dec.index_copy_(2, slot, v)
        D = q.size(-1)
        fast = decode_attention is not None and q.is_cuda and D >= 16 and D & (D - 1) == 0
        attend = decode_attention if fast else bifurcated_attention
        return attend(q, self.k_ctx, self.v_ctx, self.k_dec, self.v_dec, slot)


class StandardCache(nn.Module):
    def __init__(self, n: int, n_kv_heads: int, head_dim: int, context_len: int, max_new_tokens: int,
                 dtype: torch.dtype):
        super().__init__()
        self.context_len = context_len
        shape = (n, n_kv_heads, context_len + max_new_tokens, head_dim)  # (n, Hkv, M + T, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
        if input_pos.dim() == 1:  # prefill once, then copy the context into every sample's row
            check_prefill(q, self.context_len)
            self.k[:, :, : self.context_len] = k  # (1, Hkv, M, D) broadcast to (n, Hkv, M, D)
            self.v[:, :, : self.context_len] = v
            return causal_attention(q, k, v)
        self.k.index_copy_(2, input_pos.view(1), k)
        self.v.index_copy_(2, input_pos.view(1), v)
        mask = torch.arange(self.k.size(2), device=q.device) <= input_pos  # (M + T,) filled positions
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=mask.view(1, 1, 1, -1),
                                              enable_gqa=q.size(1) != k.size(1))


CACHES = {"bifurcated": BifurcatedCache, "standard": StandardCache}


def make_caches(attention: str, config, n: int, context_len: int, max_new_tokens: int, dtype: torch.dtype,
                device) -> list[nn.Module]:
    # config: ModelArgs; under tensor parallelism its heads are this rank's
    if attention not in CACHES:
        raise ValueError(f"unknown attention {attention!r}; known: {', '.join(CACHES)}")
    with torch.device(device):
        return [CACHES[attention](n, config.n_kv_heads, config.head_dim, context_len, max_new_tokens, dtype)
                for _ in range(config.n_layer)]


def check_prefill(q: Tensor, context_len: int):
    if q.size(0) != 1 or q.size(2) != context_len:
        raise ValueError(f"prefill takes the whole prompt of {context_len} tokens at batch 1, "
                         f"got batch {q.size(0)} x {q.size(2)} tokens")


def bifurcated_attention(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_dec: Tensor, v_dec: Tensor,
                         slot: Tensor) -> Tensor:
    """Exact attention of each sample's query over [shared context ; its own decode slots 0..slot],
    in plain PyTorch: one GEMM per KV head for the context part, then an LSE merge in fp32."""
    n, H, _, D = q.shape
    Hkv, M, _ = k_ctx.shape
    g = H // Hkv
    scale = D ** -0.5
    # Context part: the n*g query rows of KV head j form one matrix against that head's context.
    qc = q.view(n, Hkv, g, D).permute(1, 0, 2, 3).reshape(Hkv, n * g, D)  # (Hkv, n g, D)
    s_ctx = torch.bmm(qc, k_ctx.transpose(1, 2)).float() * scale  # (Hkv, n g, M)
    lse_ctx = torch.logsumexp(s_ctx, dim=-1)  # (Hkv, n g)
    p_ctx = torch.exp(s_ctx - lse_ctx[..., None]).to(v_ctx.dtype)  # (Hkv, n g, M)
    o_ctx = torch.bmm(p_ctx, v_ctx).float()  # (Hkv, n g, D)
    lse_ctx = lse_ctx.view(Hkv, n, g).permute(1, 0, 2)  # (n, Hkv, g)
    o_ctx = o_ctx.view(Hkv, n, g, D).permute(1, 0, 2, 3)  # (n, Hkv, g, D)
    # Decode part: each sample against its own filled slots 0..slot.
    qd = q.view(n, Hkv, g, D)  # (n, Hkv, g, D)
    s_dec = torch.matmul(qd, k_dec.transpose(2, 3)).float() * scale  # (n, Hkv, g, T)
    filled = torch.arange(k_dec.size(2), device=q.device) <= slot  # (T,)
    s_dec = s_dec.masked_fill(~filled, float("-inf"))
    lse_dec = torch.logsumexp(s_dec, dim=-1)  # (n, Hkv, g); slot 0 is always filled: finite
    p_dec = torch.exp(s_dec - lse_dec[..., None]).to(v_dec.dtype)  # (n, Hkv, g, T)
    o_dec = torch.matmul(p_dec, v_dec).float()  # (n, Hkv, g, D)
    # Merge: weights e^lse_i / (e^lse_ctx + e^lse_dec), computed stably.
    lse = torch.logaddexp(lse_ctx, lse_dec)  # (n, Hkv, g)
    out = torch.exp(lse_ctx - lse)[..., None] * o_ctx + torch.exp(lse_dec - lse)[..., None] * o_dec
    return out.reshape(n, H, 1, D).to(q.dtype)  # (n, H, 1, D)


def plan_memory(config, attention: str, n: int, M: int, T: int, dtype: torch.dtype) -> dict[str, int]:
    """Predicted bytes of a sampling run on the GPU, before anything is allocated."""
    b = torch.empty((), dtype=dtype).element_size()
    C, F, L, V = config.dim, config.intermediate_size, config.n_layer, config.vocab_size
    H, Hkv, D = config.n_head, config.n_kv_heads, config.head_dim
    per_layer = (H + 2 * Hkv) * D * C + H * D * C + 3 * C * F + 2 * C
    weights = (2 * V * C + L * per_layer + C) * b
    kv_token = 2 * L * Hkv * D * b  # keys and values of one token, all layers
    context = kv_token * M * (n if attention == "standard" else 1)
    decode = kv_token * n * T
    # prefill activations of one layer (RoPE in fp32, MLP intermediates); fp32 logits and sampling
    # buffers for n rows; a fixed allowance for cuBLAS, CUDA graphs and the attention kernels
    workspace = M * (8 * C * 4 + 3 * F * b) + n * V * 16 + 2**29
    if attention == "standard" and Hkv < H:  # SDPA's GQA fallback expands one layer's K and V per head
        workspace += 2 * n * H * (M + T) * D * b
    return dict(weights=weights, context=context, decode=decode, workspace=workspace,
                total=weights + context + decode + workspace)


def check_memory(config, attention: str, n: int, M: int, T: int, dtype: torch.dtype, device: torch.device):
    """Stop with the numbers, and the most samples that would fit, if a run cannot fit on the GPU.
    The model's weights are already loaded, so what is free must hold the rest."""
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    plan = plan_memory(config, attention, n, M, T, dtype)
    need = plan["total"] - plan["weights"]
    if need <= free:
        return
    one = plan_memory(config, attention, 1, M, T, dtype)
    per_sample = plan_memory(config, attention, 2, M, T, dtype)["total"] - one["total"]
    fit = (free - (one["total"] - one["weights"])) // per_sample + 1
    gb = lambda x: f"{x / 1e9:.1f}"
    raise ValueError(
        f"does not fit in GPU memory: {attention} attention, {n} samples, {M} + {T} tokens needs {gb(plan['total'])} GB "
        f"(weights {gb(plan['weights'])} + context cache {gb(plan['context'])} + decode cache {gb(plan['decode'])} "
        f"+ workspace {gb(plan['workspace'])}) with {gb(free)} GB free beside the weights; "
        + (f"at most {fit} samples fit" if fit >= 1 else "not even one sample fits: shorten the prompt"))
