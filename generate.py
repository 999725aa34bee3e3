# Parallel sampling from one prompt: load a model, prefill the prompt once (batch 1), draw the
# first token of each of n samples from the same last logits, then decode all n samples in one
# batched step per token until each hits EOS or max_new_tokens.
#
# CLI:    python generate.py --checkpoint_path DIR --prompt "def f(" --num_samples 32
# Python: model, tok = load_model(path); records, stats = complete(model, tok, "def f(", num_samples=32)
import argparse
import functools
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

import tp
from bifurcated import CACHES, check_memory, make_caches, plan_memory  # noqa: F401 (plan_memory: API)
from checkpoint import DEFAULT_CHECKPOINT, load_model, resolve_device, resolve_dtype  # noqa: F401 (API)
from model import Transformer
from tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------
# Sampling
def sample_tokens(logits: Tensor, temperature: float, top_k: Optional[int], top_p: float) -> Tensor:
    # logits (n, V) fp32 -> (n,) ids. No host sync: the exponential race below is Gumbel-max.
    if temperature == 0:
        return logits.argmax(dim=-1)
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
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_(1)
    return (probs / race).argmax(dim=-1)


def decode_step(model: Transformer, tokens: Tensor, input_pos: Tensor, temperature: float,
                top_k: Optional[int], top_p: float, vocab_size: int) -> tuple[Tensor, Tensor]:
    # tokens (n, 1) at position input_pos () -> next tokens (n,) and their log-probs (n,)
    logits = model(tokens, input_pos)[:, -1, :vocab_size].float()  # (n, V)
    nxt = sample_tokens(logits, temperature, top_k, top_p)
    logprob = torch.log_softmax(logits, dim=-1).gather(-1, nxt[:, None])[:, 0]  # (n,)
    return nxt, logprob


# ---------------------------------------------------------------------------------------------
# Generation
@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per sample, without the EOS token
    mean_logprob: list[float]  # mean log-prob under the model (temperature 1) of each sample's tokens, EOS included
    finish_reason: list[str]  # "eos" or "length"
    stats: dict = field(default_factory=dict)


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


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: Transformer, prompt_ids: Sequence[int], num_samples: int = 1, max_new_tokens: int = 128,
             temperature: float = 0.8, top_k: Optional[int] = None, top_p: float = 1.0,
             eos_ids: Sequence[int] = (), attention: str = "bifurcated", compile: bool = False,
             seed: Optional[int] = None, progress: bool = False, vocab_size: Optional[int] = None) -> Generation:
    """vocab_size: sample only ids below it (a tokenizer smaller than the model's padded embedding)."""
    check_sampling_args(num_samples, max_new_tokens, temperature, top_k, top_p, attention)
    n, M, T = num_samples, len(prompt_ids), max_new_tokens
    if M == 0:
        raise ValueError("the prompt is empty")
    if M + T > model.config.block_size:
        raise ValueError(f"prompt ({M} tokens) + max_new_tokens ({T}) = {M + T} exceeds the model's "
                         f"maximum length of {model.config.block_size}")
    device, dtype = model.output.weight.device, model.output.weight.dtype
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    torch.manual_seed(seed)
    cfg = model.config
    vocab_size = vocab_size or cfg.vocab_size
    # A run of the same sizes and settings as the last one reuses its caches and compiled step:
    # no compilation, and its CUDA graphs still point at the same cache tensors.
    key = (attention, n, M, T, compile, temperature, top_k, top_p, vocab_size)
    last = getattr(model, "last_run", None)
    if not (last and last[0] == key and all(l.attention.kv_cache is c for l, c in zip(model.layers, last[1]))):
        model.last_run = None
        model.setup(M + T)  # drop an earlier run's caches before planning and allocating new ones
        if device.type == "cuda":
            check_memory(cfg, attention, n, M, T, dtype, device)
        caches = make_caches(attention, cfg, n, M, T, dtype, device)
        model.setup(M + T, caches)
        step = functools.partial(decode_step, model, temperature=temperature, top_k=top_k, top_p=top_p,
                                 vocab_size=vocab_size)
        if compile:
            step = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        model.last_run = last = (key, caches, step)
    step = last[2]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak of this run: its caches and after
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)

    sync(device)
    t0 = time.perf_counter()
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)[None]  # (1, M)
    last = model(prompt, torch.arange(M, device=device), last_only=True)[:, -1, :vocab_size].float()  # (1, V)
    # each sample's first token is its own draw from the same last logits
    first = sample_tokens(last.expand(n, -1), temperature, top_k, top_p)  # (n,)
    out = torch.zeros(n, T, dtype=torch.long, device=device)  # (n, T)
    logprobs = torch.zeros(n, T, device=device)  # (n, T)
    out[:, 0] = first
    logprobs[:, 0] = torch.log_softmax(last, dim=-1)[0, first]
    done = torch.isin(first, eos)  # (n,)
    sync(device)
    t_prefill = time.perf_counter() - t0

    # Steady-state timing starts once compilation and CUDA-graph recording (first calls) are over.
    warmup = min(3 if compile else 0, T - 1)
    input_pos = torch.tensor(M, device=device)
    bar = Progress(T - 1) if progress else None
    steps, t_warm, t1 = 0, 0.0, time.perf_counter()
    for i in range(1, T):
        nxt, lp = step(out[:, i - 1 : i].clone(), input_pos)
        out[:, i], logprobs[:, i] = nxt, lp
        done |= torch.isin(nxt, eos)
        input_pos += 1
        steps += 1
        if steps == warmup:
            sync(device)
            t_warm, t1 = time.perf_counter() - t1, time.perf_counter()
        if bar:
            bar.update(steps)
        # checking for "all done" syncs with the device, so only every 16 steps
        if len(eos) and steps % 16 == 0 and bool(done.all()):
            break
    sync(device)
    t_decode = time.perf_counter() - t1
    if bar:
        bar.close()

    ids, lps = out[:, : steps + 1].tolist(), logprobs[:, : steps + 1].tolist()
    eos_set = set(eos_ids)
    tokens, means, reasons = [], [], []
    for row, lp in zip(ids, lps):
        end = next((j for j, t in enumerate(row) if t in eos_set), None)
        tokens.append(row[:end] if end is not None else row)
        kept = lp[: end + 1] if end is not None else lp
        means.append(sum(kept) / len(kept))
        reasons.append("eos" if end is not None else "length")
    timed_steps = steps - warmup
    stats = dict(
        prompt_tokens=M, num_samples=n, steps=steps + 1, attention=attention, seed=seed,
        prefill_ms=1e3 * t_prefill,
        decode_ms_per_step=1e3 * t_decode / timed_steps if timed_steps else float("nan"),
        compile_s=t_warm if compile else 0.0,
        tokens_per_s=n * (steps + 1) / (t_prefill + t_warm + t_decode),
        peak_memory_gb=peak_memory_gb(device),
    )
    return Generation(tokens, means, reasons, stats)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # process peak RSS (KiB on Linux)


class Progress:
    # Counts steps as the host enqueues them, so it never waits for the GPU.
    def __init__(self, total: int):
        self.total, self.shown, self.active = total, -1, total >= 64 and sys.stderr.isatty()

    def update(self, done: int):
        pct = 100 * done // self.total
        if self.active and pct != self.shown:
            self.shown = pct
            sys.stderr.write(f"\rdecoding {done}/{self.total} steps ({pct}%)")
            sys.stderr.flush()

    def close(self):
        if self.active:
            sys.stderr.write("\r" + " " * 40 + "\r")


def complete(model: Transformer, tokenizer: Optional[Tokenizer], prompt, num_samples: int = 1,
             **kwargs) -> tuple[list[dict], dict]:
    """Sample completions of one prompt (text, or a list of token ids); returns one record per
    sample, as written to --output, and the stats."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: give token ids (--prompt_len N)")
        if not prompt:
            raise ValueError("the prompt is empty")
        prompt_ids = tokenizer.encode(prompt, bos=True)
    else:
        prompt_ids = list(prompt)
    eos_ids, vocab_size = (sorted(tokenizer.stop_ids), tokenizer.vocab_size) if tokenizer is not None else ((), None)
    gen = generate(model, prompt_ids, num_samples, eos_ids=eos_ids, vocab_size=vocab_size, **kwargs)
    records = [dict(sample=i, prompt_tokens=len(prompt_ids), tokens=toks,
                    text=continuation(tokenizer, prompt_ids, toks) if tokenizer is not None else None,
                    mean_logprob=mp, finish_reason=fr)
               for i, (toks, mp, fr) in enumerate(zip(gen.tokens, gen.mean_logprob, gen.finish_reason))]
    return records, gen.stats


def continuation(tokenizer: Tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    # Decoding the new ids alone can lose a leading space (sentencepiece strips one at the start
    # of a text), so decode prompt + new ids and cut the prompt's text off.
    head, full = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + ids)
    return full[len(head) :] if full.startswith(head) else tokenizer.decode(ids)


def rerank_records(records: list[dict]) -> list[dict]:
    """Best first by mean token log-probability, each record given its `rank` (1 = best)."""
    ranked = sorted(records, key=lambda r: r["mean_logprob"], reverse=True)
    return [dict(r, rank=i + 1) for i, r in enumerate(ranked)]


# ---------------------------------------------------------------------------------------------
# CLI
def write_jsonl(path: str, records: list[dict]):
    # a temporary file in the same directory, renamed at the end: never a half-written file
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def read_prompt(prompt: Optional[str], prompt_file: Optional[str], prompt_len: Optional[int],
                vocab_size: int) -> str | list[int]:
    given = [x is not None for x in (prompt, prompt_file, prompt_len)]
    if sum(given) != 1:
        raise ValueError("give exactly one of --prompt, --prompt_file, --prompt_len")
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read prompt file {prompt_file}: {e}") from None
    if prompt is not None:
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be at least 1, got {prompt_len}")
    # random ids from a fixed generator: the same prompt for every run and every mode
    return torch.randint(0, vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()


def main(checkpoint_path: Optional[str], prompt: Optional[str], prompt_file: Optional[str],
         prompt_len: Optional[int], num_samples: int, max_new_tokens: int, temperature: float,
         top_k: Optional[int], top_p: float, seed: Optional[int], attention: str, device: Optional[str],
         dtype: Optional[str], compile: Optional[bool], rerank: bool, output: Optional[str]):
    check_sampling_args(num_samples, max_new_tokens, temperature, top_k, top_p, attention)
    if output is not None and not Path(output).parent.is_dir():
        raise ValueError(f"output directory does not exist: {Path(output).parent}")
    dev = resolve_device(device)
    rank, world, _ = tp.world_info()  # launched by torchrun: one process per GPU, tensor parallel
    if world > 1:
        dev = tp.init_distributed(dev)
    prepare = functools.partial(tp.apply_tp, rank=rank, world=world) if world > 1 else None
    model, tokenizer = load_model(checkpoint_path, dev, resolve_dtype(dtype, dev), prepare)
    if world > 1:
        seed = tp.same_on_all_ranks(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ())))
    prompt = read_prompt(prompt, prompt_file, prompt_len, model.config.vocab_size)
    compile = dev.type == "cuda" if compile is None else compile
    records, stats = complete(model, tokenizer, prompt, num_samples, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p, attention=attention,
                              compile=compile, seed=seed, progress=rank == 0)
    if rerank:
        records = rerank_records(records)
    if rank == 0:  # every rank holds the same samples; one prints and writes them
        report(records, stats, f"model {checkpoint_path} on {dev}" + (f" x {world} ranks" if world > 1 else "")
               + f" ({model.output.weight.dtype}), attention {attention}", compile)
        if output is not None:
            write_jsonl(output, records)
            print(f"wrote {len(records)} samples to {output}")


def report(records: list[dict], stats: dict, setup: str, compile: bool):
    for r in records:
        rank = f"rank {r['rank']}: " if "rank" in r else ""
        print(f"--- {rank}sample {r['sample']} ({r['finish_reason']}, {len(r['tokens'])} tokens, "
              f"mean logprob {r['mean_logprob']:.3f}) ---")
        print(r["text"] if r["text"] is not None else r["tokens"])
    print("--- stats ---")
    print(f"{setup}, seed {stats['seed']}")
    print(f"prompt {stats['prompt_tokens']} tokens, {stats['num_samples']} samples x {stats['steps']} steps")
    print(f"prefill {stats['prefill_ms']:.1f} ms | decode {stats['decode_ms_per_step']:.2f} ms/step | "
          f"{stats['tokens_per_s']:.1f} tokens/s (all samples, prefill included)"
          + (f" | compile {stats['compile_s']:.1f} s" if compile else ""))
    print(f"peak memory {stats['peak_memory_gb']:.2f} GB")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Parallel sampling from one prompt with bifurcated attention.")
    p.add_argument("--checkpoint_path", default=str(DEFAULT_CHECKPOINT),
                   help="converted checkpoint (file or directory), or synthetic:NAME (default: the shipped tiny code model)")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt_file", help="read the prompt from this file")
    p.add_argument("--prompt_len", type=int, help="random prompt of this many token ids (no tokenizer needed)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="default: a fresh seed, printed in the stats")
    p.add_argument("--attention", default="bifurcated", help="bifurcated (default) or standard")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile + CUDA graphs for the decode step (default: on for cuda, off for cpu)")
    p.add_argument("--rerank", action="store_true", help="order the samples by mean token log-probability, best first")
    p.add_argument("--output", help="write one JSON object per sample to this .jsonl file")
    args = p.parse_args()
    try:
        main(**vars(args))
    except (ValueError, OSError, torch.OutOfMemoryError) as e:
        rank = tp.world_info()[0]
        if rank:  # under torchrun, rank 0 says why; another rank speaks only if it failed alone
            time.sleep(2)  # (torchrun stops the others as soon as the first process exits)
        oom = isinstance(e, torch.OutOfMemoryError)
        print(f"error{f' (rank {rank})' if rank else ''}: {'out of GPU memory; try fewer samples or tokens' if oom else e}",
              file=sys.stderr)
        sys.exit(1)
    tp.exit_distributed()  # after success only: its barrier would wait forever for a rank that failed alone
