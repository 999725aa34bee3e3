# KV caches for parallel sampling from one prompt, and exact bifurcated attention.
#
# Bifurcated (arXiv 2403.08845): the prompt's keys and values (the context) are stored once per
# layer and read once per decode step for all n samples; each sample keeps only its own decoded
# tokens. Standard: the context is copied into every sample's row, as a plain batched engine
# does; kept as the baseline (`--attention standard`).
#
# Both are the model's attention seam: called with q, k, v (before RoPE), the positions' rotation
# freqs_cis and input_pos, they rotate q and k, store k and v and return the attention output.
# input_pos is (S,) in prefill (the prompt, batch 1) and () in a decode step (one new token for each
# of the n samples, all at the same position). On the GPU a decode step rotates and stores in the
# epilogue of the qkv layer's kernel where that kernel runs it (BifurcatedCache.qkv_attention, which the model
# calls first), else in one kernel (bifurcated_triton.rope_store) or, with few samples, in the attention's launch.
#
# Dimension letters: n samples, M context (prompt) length, T decode capacity (max new tokens),
# H query heads, Hkv key/value heads, g = H / Hkv query heads per KV head, D head dim.
import itertools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from model import causal_attention, rotate_heads_first

try:  # the fused Triton kernels for CUDA; CPU-only installs have no Triton and use the reference
    from bifurcated_triton import (decode_attention, prefix_decode_attention, rope_decode_attention, rope_store,
                                   rope_store_context)
    import linear_triton
except ImportError:
    decode_attention = prefix_decode_attention = rope_decode_attention = rope_store = rope_store_context = None
    linear_triton = None


def fast(q: Tensor) -> bool:  # the Triton kernels: CUDA, a head dim the tiles take
    D = q.size(-1)
    return decode_attention is not None and q.is_cuda and D >= 16 and D & (D - 1) == 0


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

    def forward(self, q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor, input_pos: Tensor) -> Tensor:
        if input_pos.dim() == 1:  # prefill: the prompt, batch 1, into the context cache
            check_prefill(q.size(0), q.size(1), self.context_len)
            q = store_context(q, k, v, freqs_cis, self.k_ctx, self.v_ctx)  # (1, H, M, D)
            return causal_attention(q, self.k_ctx[None], self.v_ctx[None])
        # decode: q (n, 1, H, D), k, v (n, 1, Hkv, D); this step's slot in the decode part is
        # input_pos - M, a device tensor: no host sync
        M = self.context_len
        if fast(q):  # the kernels take the position and M: no slot computed apart in every layer
            return rope_decode_attention(q, k, v, freqs_cis, self.k_ctx, self.v_ctx, self.k_dec, self.v_dec,
                                         input_pos.view(1), M)
        slot = (input_pos - M).view(1)  # (1,)
        q = store_decode(q, k, v, freqs_cis, self.k_dec, self.v_dec, slot)
        return bifurcated_attention(q, self.k_ctx, self.v_ctx, self.k_dec, self.v_dec, slot)

    def qkv_attention(self, wqkv: nn.Module, x: Tensor, freqs_cis: Tensor, input_pos: Tensor) -> Optional[Tensor]:
        """A decode step from x (n, 1, C) through the qkv layer wqkv to the attention output (n, H, 1, D),
        where the layer's kernel takes RoPE and the store of k and v in its epilogue (linear_triton.qkv_rope): one
        launch less a layer. None elsewhere (a prefill, the CPU, a layer or shape the kernel does not take it
        for): the caller goes through forward."""
        D = self.k_dec.size(-1)
        if input_pos.dim() == 1 or linear_triton is None or not fast(self.k_dec):
            return None
        ops = linear_triton.rope_operands(wqkv, x, D)
        if ops is None:
            return None
        pos = input_pos.view(1)
        q = linear_triton.qkv_rope(x, *ops, freqs_cis, self.k_dec, self.v_dec, pos, self.context_len)
        return decode_attention(q, self.k_ctx, self.v_ctx, self.k_dec, self.v_dec, pos, self.context_len)


class StandardCache(nn.Module):
    def __init__(self, n: int, n_kv_heads: int, head_dim: int, context_len: int, max_new_tokens: int,
                 dtype: torch.dtype):
        super().__init__()
        self.context_len = context_len
        shape = (n, n_kv_heads, context_len + max_new_tokens, head_dim)  # (n, Hkv, M + T, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor, input_pos: Tensor) -> Tensor:
        q, k, v = rotate_heads_first(q, k, v, freqs_cis)  # (B, H, S, D), (B, Hkv, S, D) x 2
        if input_pos.dim() == 1:  # prefill once, then copy the context into every sample's row
            check_prefill(q.size(0), q.size(2), self.context_len)
            self.k[:, :, : self.context_len] = k  # (1, Hkv, M, D) broadcast to (n, Hkv, M, D)
            self.v[:, :, : self.context_len] = v
            return causal_attention(q, k, v)
        self.k.index_copy_(2, input_pos.view(1), k)
        self.v.index_copy_(2, input_pos.view(1), v)
        mask = torch.arange(self.k.size(2), device=q.device) <= input_pos  # (M + T,) filled positions
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=mask.view(1, 1, 1, -1),
                                              enable_gqa=q.size(1) != k.size(1))


class PrefixCache(nn.Module):
    """Several prompts, n samples each, in three levels: a prefix shared by all prompts (stored and
    read once), each prompt's own tokens (once per prompt, read up to its length), each sample's
    decoded tokens. Rows are prompt-major: row p n + i is sample i of prompt p."""

    def __init__(self, n: int, n_kv_heads: int, head_dim: int, prefix_len: int, prompt_lens: list[int],
                 max_new_tokens: int, dtype: torch.dtype, prompt_capacity: int = 0):
        super().__init__()  # each prompt's level holds max(prompt_lens, prompt_capacity) tokens
        Np, L, D = len(prompt_lens), max(*prompt_lens, prompt_capacity), head_dim
        self.prefix_len, self.prompt_lens = prefix_len, prompt_lens
        self.prompts = False  # prefill: the prefix, or every prompt, one after another in one sequence
        for name, shape in [("pre", (n_kv_heads, prefix_len, D)), ("prm", (Np, n_kv_heads, L, D)),
                            ("dec", (Np * n, n_kv_heads, max_new_tokens, D))]:
            self.register_buffer("k_" + name, torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer("v_" + name, torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("prm_len", torch.tensor(prompt_lens), persistent=False)  # (P,)

    def set_prompts(self, prompt_lens: list[int]):
        """Other prompts, as many, in the same tensors (a compiled step and its CUDA graph read them)."""
        if len(prompt_lens) != self.k_prm.size(0) or max(prompt_lens) > self.k_prm.size(2):
            raise ValueError(f"{len(prompt_lens)} prompts of up to {max(prompt_lens)} tokens in a cache for "
                             f"{self.k_prm.size(0)} of up to {self.k_prm.size(2)}")
        self.prompt_lens = prompt_lens
        self.prm_len.copy_(torch.tensor(prompt_lens))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor, input_pos: Tensor) -> Tensor:
        Mp = self.prefix_len
        if input_pos.dim() == 2:  # decode: input_pos (P n, 1), each row's position; the slot is the same for all
            caches = self.k_pre, self.v_pre, self.k_prm, self.v_prm, self.prm_len, self.k_dec, self.v_dec
            # (1,), a device tensor: no host sync, and no prompt length in a compiled step (set_prompts)
            slot = (input_pos[0, 0] - Mp - self.prm_len[0]).view(1)
            if fast(q):
                q = rope_store(q, k, v, freqs_cis, self.k_dec, self.v_dec, slot)
                return prefix_decode_attention(q, *caches, slot)
            return prefix_attention(store_decode(q, k, v, freqs_cis, self.k_dec, self.v_dec, slot), *caches, slot)
        if not self.prompts:  # the prefix, batch 1, from position 0
            check_prefill(q.size(0), q.size(1), Mp)
            q = store_context(q, k, v, freqs_cis, self.k_pre, self.v_pre)  # (1, H, Mp, D)
            return causal_attention(q, self.k_pre[None], self.v_pre[None])
        # the prompts, batch 1, concatenated: each continues the prefix (its positions from Mp); the
        # products of the layers take all their tokens at once, the attention each prompt apart
        if q.size(0) != 1 or q.size(1) != sum(self.prompt_lens):
            raise ValueError(f"the prompts' prefill takes their {sum(self.prompt_lens)} tokens in one row, "
                             f"got {q.size(0)} x {q.size(1)}")
        ends = list(itertools.accumulate(self.prompt_lens))
        return torch.cat([self.prompt_attention(p, *(t[:, e - L:e] for t in (q, k, v)), freqs_cis[e - L:e])
                          for p, (L, e) in enumerate(zip(self.prompt_lens, ends))], dim=2)  # (1, H, S, D)

    def prompt_attention(self, p: int, q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor) -> Tensor:
        # prompt p's q, k, v (1, L, H or Hkv, D): its keys and values stored, its attention over
        # [prefix ; causal own]
        Mp, L = self.prefix_len, q.size(1)
        q = store_context(q, k, v, freqs_cis, self.k_prm[p], self.v_prm[p])  # (1, H, L, D)
        k, v = self.k_prm[p : p + 1, :, :L], self.v_prm[p : p + 1, :, :L]  # (1, Hkv, L, D)
        keys = torch.cat([self.k_pre[None], k], dim=2), torch.cat([self.v_pre[None], v], dim=2)
        # query i sees the prefix and the prompt's keys up to its own: causal from the lower right, which SDPA
        # takes to its flash kernel; a boolean mask went to cuDNN, which built a plan for each new length
        # (about 70 ms of host time per prompt on an H200: bench/results/h200/profile-many.md)
        return F.scaled_dot_product_attention(q, *keys, attn_mask=causal_lower_right(L, Mp + L),
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


def free_caches(caches: list[nn.Module]):
    """Give back the memory of a finished run's caches now, whoever still refers to them: after a compiled
    run, PyTorch's compiler keeps its last graph (real tensors in its nodes' metadata) until it compiles
    another, and with it the caches of that run. On an H100 they were still allocated when the next run
    measured the free memory (34.6 GB after a standard run at 8K n = 8: free-memory-probe.txt), and after
    8K n = 512 the plan said a standard run at n = 8 that fits did not."""
    for cache in caches:
        for buf in cache.buffers():
            buf.untyped_storage().resize_(0)


def store_decode(q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor, k_dec: Tensor, v_dec: Tensor,
                 slot: Tensor) -> Tensor:
    """A decode step's q, k, v (B, 1, H or Hkv, D): rotate q and k, store k and v in the samples'
    slot of k_dec, v_dec (B, Hkv, T, D); returns q, rotated, (B, H, 1, D). Plain PyTorch: the
    reference of bifurcated_triton.rope_store."""
    q, k, v = rotate_heads_first(q, k, v, freqs_cis)
    k_dec.index_copy_(2, slot, k)
    v_dec.index_copy_(2, slot, v)
    return q


def store_context(q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor, k_ctx: Tensor, v_ctx: Tensor) -> Tensor:
    """A prefill's q, k, v (1, S, H or Hkv, D): rotate q and k, store k and v in positions 0..S-1 of
    k_ctx, v_ctx (Hkv, >= S, D); returns q, rotated, (1, H, S, D). On the GPU one kernel
    (bifurcated_triton.rope_store_context); compiled code keeps the plain form, which Inductor fuses."""
    if fast(q) and not torch.compiler.is_compiling():
        return rope_store_context(q, k, v, freqs_cis, k_ctx, v_ctx)[None].transpose(1, 2)  # (1, H, S, D)
    q, k, v = rotate_heads_first(q, k, v, freqs_cis)  # (1, H, S, D), (1, Hkv, S, D) x 2
    S = q.size(2)
    k_ctx[:, :S] = k[0]
    v_ctx[:, :S] = v[0]
    return q


def check_prefill(batch: int, tokens: int, context_len: int):
    if batch != 1 or tokens != context_len:
        raise ValueError(f"prefill takes the whole prompt of {context_len} tokens at batch 1, "
                         f"got batch {batch} x {tokens} tokens")


def partial_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Softmax attention over one part of the keys: (normalized output, log-sum-exp), both fp32.
    q (..., R, D), k, v (..., N, D), mask broadcast to (..., R, N), True = attend. A part with no
    key (N = 0, or all masked) gives output 0 and log-sum-exp -inf: weight 0 in the merge."""
    s = torch.matmul(q, k.transpose(-1, -2)).float() * q.size(-1) ** -0.5  # (..., R, N)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (..., R)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0)[..., None])  # 0 where nothing is attended
    return torch.matmul(p.to(v.dtype), v).float(), lse  # (..., R, D), (..., R)


def merge_partials(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Exact attention over all parts from each part's (output, log-sum-exp): weights e^lse_i / sum e^lse."""
    lse = torch.logsumexp(torch.stack([l for _, l in parts]), dim=0)  # (..., R)
    return sum(torch.exp(l - lse)[..., None] * o for o, l in parts)  # (..., R, D)


def bifurcated_attention(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_dec: Tensor, v_dec: Tensor,
                         slot: Tensor) -> Tensor:
    """Exact attention of each sample's query over [shared context ; its own decode slots 0..slot],
    in plain PyTorch: one GEMM per KV head for the context part, then an LSE merge in fp32."""
    n, H, _, D = q.shape
    Hkv = k_ctx.size(0)
    g = H // Hkv
    # Context part: the n*g query rows of KV head j form one matrix against that head's context.
    qc = q.view(n, Hkv, g, D).transpose(0, 1).reshape(Hkv, n * g, D)  # (Hkv, n g, D)
    o_ctx, lse_ctx = partial_attention(qc, k_ctx, v_ctx)  # (Hkv, n g, D), (Hkv, n g)
    ctx = o_ctx.view(Hkv, n, g, D).transpose(0, 1), lse_ctx.view(Hkv, n, g).transpose(0, 1)  # (n, Hkv, g, ...)
    # Decode part: each sample against its own filled slots 0..slot.
    filled = torch.arange(k_dec.size(2), device=q.device) <= slot  # (T,)
    dec = partial_attention(q.view(n, Hkv, g, D), k_dec, v_dec, filled)  # (n, Hkv, g, D), (n, Hkv, g)
    return merge_partials([ctx, dec]).reshape(n, H, 1, D).to(q.dtype)  # (n, H, 1, D)


def prefix_attention(q: Tensor, k_pre: Tensor, v_pre: Tensor, k_prm: Tensor, v_prm: Tensor, prm_len: Tensor,
                     k_dec: Tensor, v_dec: Tensor, slot: Tensor) -> Tensor:
    """Exact attention of each row over [shared prefix ; its prompt's own tokens ; its own decode
    slots 0..slot], three parts merged by log-sum-exp. Rows are prompt-major: row p n + i is
    sample i of prompt p. q (P n, H, 1, D); k_pre (Hkv, Mp, D); k_prm (P, Hkv, L, D), prompt p
    filled up to prm_len[p]; k_dec (P n, Hkv, T, D)."""
    B, H, _, D = q.shape
    Np, Hkv, L, _ = k_prm.shape
    n, g = B // Np, H // Hkv
    qh = q.view(Np, n, Hkv, g, D).permute(2, 0, 1, 3, 4)  # (Hkv, P, n, g, D)
    o, lse = partial_attention(qh.reshape(Hkv, B * g, D), k_pre, v_pre)  # the prefix: one matrix per KV head
    pre = o.view(Hkv, Np, n, g, D), lse.view(Hkv, Np, n, g)
    own = torch.arange(L, device=q.device) < prm_len[:, None, None, None]  # (P, 1, 1, L)
    o, lse = partial_attention(qh.transpose(0, 1).reshape(Np, Hkv, n * g, D), k_prm, v_prm, own)  # per prompt
    prm = o.view(Np, Hkv, n, g, D).transpose(0, 1), lse.view(Np, Hkv, n, g).transpose(0, 1)
    filled = torch.arange(k_dec.size(2), device=q.device) <= slot  # (T,)
    o, lse = partial_attention(q.view(B, Hkv, g, D), k_dec, v_dec, filled)  # each row's own tokens
    dec = o.view(Np, n, Hkv, g, D).permute(2, 0, 1, 3, 4), lse.view(Np, n, Hkv, g).permute(2, 0, 1, 3)
    out = merge_partials([pre, prm, dec])  # (Hkv, P, n, g, D)
    return out.permute(1, 2, 0, 3, 4).reshape(B, H, 1, D).to(q.dtype)


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


class DoesNotFit(ValueError):
    """A run too large for the GPU's free memory; with several prompts, groups: consecutive prompts
    that would fit, each group one run (prompt_groups)."""
    def __init__(self, message: str, groups: Optional[list[range]] = None):
        super().__init__(message)
        self.groups = groups


def free_memory(device) -> Optional[int]:
    """Bytes a run can still allocate on the GPU (the weights are loaded); None on a CPU: no limit."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def prompt_groups(config, n: int, prefix_len: int, prompt_lens: list[int], T: int, dtype: torch.dtype,
                  free: int, prompt_capacity: int = 0) -> list[range]:
    """Consecutive prompts in groups whose three-level caches each fit in free bytes, as many prompts
    to a group as fit (a group of one that does not fit is check_memory's to report)."""
    def fits(lens: list[int]) -> bool:  # each prompt's level is padded to the longest (or the capacity)
        plan = plan_memory(config, "bifurcated", len(lens) * n, prefix_len + len(lens) * max(*lens, prompt_capacity),
                           T, dtype)
        return plan["total"] - plan["weights"] <= free

    groups, first = [], 0
    for p in range(1, len(prompt_lens)):
        if not fits(prompt_lens[first : p + 1]):
            groups.append(range(first, p))
            first = p
    return groups + [range(first, len(prompt_lens))]


def check_memory(config, attention: str, n: int, M: int, T: int, dtype: torch.dtype, free: int):
    """Stop with the numbers, and the most samples that would fit, if a run cannot fit in the free
    bytes of the GPU (free_memory: the model's weights are already loaded)."""
    plan = plan_memory(config, attention, n, M, T, dtype)
    need = plan["total"] - plan["weights"]
    if need <= free:
        return
    one = plan_memory(config, attention, 1, M, T, dtype)
    per_sample = plan_memory(config, attention, 2, M, T, dtype)["total"] - one["total"]
    fit = (free - (one["total"] - one["weights"])) // per_sample + 1
    gb = lambda x: f"{x / 1e9:.1f}"
    raise DoesNotFit(
        f"does not fit in GPU memory: {attention} attention, {n} samples, {M} + {T} tokens needs {gb(plan['total'])} GB "
        f"(weights {gb(plan['weights'])} + context cache {gb(plan['context'])} + decode cache {gb(plan['decode'])} "
        f"+ workspace {gb(plan['workspace'])}) with {gb(free)} GB free beside the weights; "
        + (f"at most {fit} samples fit" if fit >= 1 else "not even one sample fits: shorten the prompt"))
