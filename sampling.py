# Sampling the next token of every row from its logits, on the device and without a host sync, so
# that it runs inside the compiled, CUDA-graphed decode step: temperature, top-k, top-p, then
# Gumbel-max; greedy at temperature 0. next_tokens is the step's tail: the final norm, the head, a
# draw and its log-prob. check_sampling_args: a run's settings, checked before anything loads.
from typing import Optional

import torch
from torch import Tensor

from bifurcated import CACHES
from model import Transformer


def argmax_rows(x: Tensor, chunks: int = 64) -> Tensor:
    # x (n, V) -> (n,), as x.argmax(-1) (the first of equal maxima), in two passes: the largest of each
    # of a row's chunks, then of those, so that a few rows spread over many programs. Compiled, on the
    # H100: one program per row took 24 us of a decode step at n = 1; 8K n = 1 6.78 -> 6.76 ms a step
    x = torch.nn.functional.pad(x, (0, -x.size(1) % chunks), value=float("-inf")).view(len(x), chunks, -1)
    best, at = x.max(dim=-1)  # (n, chunks) each
    c = best.argmax(dim=-1, keepdim=True)  # (n, 1)
    return (c * x.size(-1) + at.gather(-1, c))[:, 0]


def sample_tokens(logits: Tensor, temperature: float, top_k: Optional[int], top_p: float, groups: int = 1) -> Tensor:
    # logits (n, V) fp32 -> (n,) ids. No host sync: the exponential race below is Gumbel-max.
    # groups: the rows are that many prompts' samples, prompt-major, and each prompt draws the same
    # noise, so that its samples are those it would get alone with the same seed.
    if temperature == 0:
        return argmax_rows(logits)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (n, V)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p  # (n, V); the first is kept
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    race = torch.empty_like(logits[: logits.size(0) // groups]).exponential_(1).repeat(groups, 1)  # (n, V)
    # the token of the largest softmax(logits) / race; the softmax's normalization does not move it,
    # so no pass over the vocabulary for it: the largest logits - log(race)
    return argmax_rows(logits - race.log())


def next_tokens(model: Transformer, x: Tensor, temperature: float, top_k: Optional[int], top_p: float,
                vocab_size: int, groups: int = 1) -> tuple[Tensor, Tensor]:
    # x (n, 1, C) the last layer's output (the decode step's: compiled.DecodeLoop) -> next tokens (n,),
    # their log-probs (n,)
    logits = model.output(model.norm(x))[:, -1, :vocab_size].float()  # (n, V)
    nxt = sample_tokens(logits, temperature, top_k, top_p, groups)
    logprob = logits.gather(-1, nxt[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)  # (n,): log_softmax's, at nxt
    return nxt, logprob


def check_sampling_args(num_samples: int, max_new_tokens: int, temperature: float, top_k: Optional[int],
                        top_p: float, attention: str):
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if attention not in CACHES:
        raise ValueError(f"unknown attention {attention!r}; known: {', '.join(CACHES)}")
