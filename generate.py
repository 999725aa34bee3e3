# Parallel sampling from shared prompts: load a model, prefill the prompt once (batch 1), draw the
# first token of each of n samples from the same last logits, then decode all n samples in one
# batched step per token until each hits EOS, a stop text or max_new_tokens. Several prompts after a
# shared prefix: the prefix is prefilled once, each prompt continues from it, all P x n samples decode together.
# CLI:    python generate.py --prompt "def f(" --num_samples 32   (or --prompt_file F --shared_prefix T)
# Python: model, tok = load_model(path); records, stats = complete(model, tok, "def f(", num_samples=32)
import argparse
import dataclasses
import functools
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

import tp
from bifurcated import DoesNotFit, PrefixCache, check_memory, free_caches, free_memory, make_caches, prompt_groups
from bifurcated import plan_memory  # noqa: F401 (API: scripts/benchmark.py records its plan)
from checkpoint import DEFAULT_CHECKPOINT, load_model, resolve_device, resolve_dtype  # noqa: F401 (API)
from compiled import DecodeLoop, Progress, peak_memory_gb, prefill_step, sync
from model import Transformer
from sampling import check_sampling_args, next_tokens, sample_tokens
from tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------
# Generation
@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per sample, without the EOS token, through a stop text's last
    mean_logprob: list[float]  # mean log-prob under the model (temperature 1) of each sample's tokens, EOS included
    finish_reason: list[str]  # "eos", "stop" or "length"
    stats: dict = field(default_factory=dict)


def generate(model: Transformer, prompt_ids: Sequence[int], num_samples: int = 1, max_new_tokens: int = 128,
             **kwargs) -> Generation:
    """n samples of one prompt (token ids); the settings are generate_many's."""
    return generate_many(model, [prompt_ids], (), num_samples, max_new_tokens, **kwargs)[0]


@torch.no_grad()
def generate_many(model: Transformer, prompts: Sequence[Sequence[int]], prefix_ids: Sequence[int] = (),
                  num_samples: int = 1, max_new_tokens: int = 128, temperature: float = 0.8,
                  top_k: Optional[int] = None, top_p: float = 1.0, eos_ids: Sequence[int] = (),
                  attention: str = "bifurcated", compile: bool = False, seed: Optional[int] = None,
                  progress: bool = False, vocab_size: Optional[int] = None,
                  stop_at: Optional[Callable[[int, list[int], int], Optional[int]]] = None,
                  prompt_capacity: int = 0) -> list[Generation]:
    """n samples of each prompt (token ids), each placed after the shared prefix: one Generation per
    prompt, the same samples it would get alone (prefix + prompt, same seed). Several prompts use
    three cache levels (bifurcated.PrefixCache); one runs prefix + prompt as its context.
    vocab_size: sample only ids below it (a tokenizer smaller than the model's padded embedding).
    stop_at(p, ids, since): how many of ids (of prompt p) end at a stop text, or None (Tokenizer.stop_at).
    prompt_capacity: each prompt's cache level holds this many tokens at least, so that a later run of as
    many prompts, none longer, reuses the caches and the compiled step (complete_many's groups)."""
    check_sampling_args(num_samples, max_new_tokens, temperature, top_k, top_p, attention)
    prefix, prompts = list(prefix_ids), [list(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts")
    if len(prompts) == 1:  # one context, as one prompt always ran
        prefix, prompts = [], [prefix + prompts[0]]
    Np, n, Mp, T = len(prompts), num_samples, len(prefix), max_new_tokens
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise ValueError("the prompt is empty" if Np == 1 else f"prompt {lens.index(0)} is empty")
    if Np > 1 and attention != "bifurcated":
        raise ValueError(f"several prompts run with bifurcated attention only, not {attention}")
    L = max(*lens, prompt_capacity) if Np > 1 else lens[0]  # a prompt's level
    M = Mp + L  # the longest context
    if M + T > model.config.block_size:
        raise ValueError(f"prompt ({M} tokens) + max_new_tokens ({T}) = {M + T} exceeds the model's "
                         f"maximum length of {model.config.block_size}")
    device, dtype = model.output.weight.device, model.output.weight.dtype
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    torch.manual_seed(seed)
    cfg, B = model.config, Np * n
    vocab_size = vocab_size or cfg.vocab_size
    if Np == 1:  # the first decoded token's position
        input_pos = torch.tensor(M, device=device)  # one position for all rows
    else:
        input_pos = torch.tensor([Mp + L for L in lens], device=device).repeat_interleave(n)[:, None]  # (B, 1)
    # A run of the same sizes and settings as the last one reuses its caches, compiled step and
    # prefill: no compilation, and its CUDA graphs still point at the same cache tensors.
    key = (attention, n, Mp, Np, L, T, compile, temperature, top_k, top_p, vocab_size)
    last = getattr(model, "last_run", None)
    if not (last and last[0] == key and all(l.attention.kv_cache is c for l, c in zip(model.layers, last[1]))):
        if last:  # nothing runs on its caches again
            free_caches(last[1])
        model.last_run = None
        model.setup(M + T)  # drop an earlier run's caches before planning and allocating new ones
        if device.type == "cuda":
            gc.collect()  # and its compiled step and CUDA graphs, held in reference cycles, before measuring
        free = tp.smallest_on_all_ranks(free_memory(device))  # None on a CPU; all ranks make one plan
        groups = prompt_groups(cfg, n, Mp, lens, T, dtype, free, L) if Np > 1 and free is not None else []
        if len(groups) > 1:  # complete_many runs such groups one after another
            raise DoesNotFit(f"does not fit in GPU memory: {Np} prompts x {n} samples at once; in {len(groups)} "
                             "runs of consecutive prompts they would", groups)
        if free is not None:  # the context tokens held once, each prompt's level padded to the longest
            check_memory(cfg, attention, B, Mp + Np * L, T, dtype, free)
        if Np == 1:
            caches = make_caches(attention, cfg, n, M, T, dtype, device)
        else:
            with torch.device(device):
                caches = [PrefixCache(n, cfg.n_kv_heads, cfg.head_dim, Mp, lens, T, dtype, L) for _ in model.layers]
        model.setup(M + T, caches)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab_size, groups=Np)
        loop = DecodeLoop(model, functools.partial(next_tokens, **sampling), B, T, input_pos, compile)
        model.last_run = last = (key, caches, loop, prefill_step(model, M, compile) if Np == 1 else None)
    caches, loop, prefill_one = last[1:]
    for c in caches if Np > 1 else ():  # the same sizes, other prompts
        c.set_prompts(lens)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak of this run: its caches and after
    eos_set = set(eos_ids)
    eos = torch.tensor(sorted(eos_set), dtype=torch.long, device=device)

    def ending(r: int, row: list[int], since: int = 0) -> tuple[int, str]:
        # row r's generated ids -> how many of them it keeps (without an EOS token), and why it ended;
        # since: the text of row[:since] held no stop text (stop_at's first look)
        end = next((j for j, t in enumerate(row) if t in eos_set), len(row))  # ids after an EOS are not its
        stop = stop_at(r // n, row[:end], since) if stop_at else None
        return (stop, "stop") if stop is not None else (end, "eos" if end < len(row) else "length")

    ended = {}  # row -> its ending, once it has hit an EOS token or a stop text (the same in any longer row)
    checked = [0]  # the columns seen at the last check

    def all_done(cols: int) -> bool:  # syncs with the device
        if stop_at is None:
            return bool(torch.isin(loop.out[:, :cols], eos).any(1).all())
        rows, (since,) = loop.out[:, :cols].tolist(), checked
        for r in set(range(B)) - ended.keys():
            if (end := ending(r, rows[r], since))[1] != "length":
                ended[r] = end
        checked[0] = cols
        return len(ended) == B

    sync(device)
    t0 = time.perf_counter()
    as_ids = lambda ids: torch.tensor(ids, dtype=torch.long, device=device)[None]  # (1, S)
    if Np == 1:
        last_logits = prefill_one(as_ids(prompts[0]))[:, -1]  # (1, V)
    else:  # the prefix once, then the prompts in one sequence, each continuing from the prefix's keys and values
        def prefill(prompts_: bool, ids: list[int], pos: list[int]) -> Tensor:  # (S, C)
            for c in caches:
                c.prompts = prompts_
            return model.hidden(as_ids(ids), torch.tensor(pos, device=device))[0]

        if Mp:
            prefill(False, prefix, list(range(Mp)))
        x = prefill(True, [t for p in prompts for t in p], [Mp + i for L in lens for i in range(L)])
        last_logits = model.output(model.norm(x[torch.tensor(lens).cumsum(0) - 1]))  # (P, V): each prompt's last
    last_logits = last_logits[:, :vocab_size].float().repeat_interleave(n, dim=0)  # (B, V), prompt-major rows
    # each sample's first token is its own draw from its prompt's last logits
    first = sample_tokens(last_logits, temperature, top_k, top_p, groups=Np)  # (B,)
    loop.start(first, torch.log_softmax(last_logits, dim=-1).gather(-1, first[:, None])[:, 0], input_pos)
    sync(device)
    t_prefill = time.perf_counter() - t0

    # Steady-state timing starts once compilation and CUDA-graph recording (first calls) are over.
    warmup = min(3 if compile else 0, T - 1)
    bar = Progress(T - 1, progress)
    steps, t_warm, t1 = 0, 0.0, time.perf_counter()
    for i in range(1, T):
        loop.advance()  # fills column i of loop.out and loop.logprobs
        steps += 1
        if steps == warmup:
            sync(device)
            t_warm, t1 = time.perf_counter() - t1, time.perf_counter()
        bar.update(steps)
        # checking for "all done" syncs with the device, so only every 16 steps
        if (len(eos) or stop_at) and steps % 16 == 0 and all_done(i + 1):
            break
    sync(device)
    t_decode = time.perf_counter() - t1
    bar.close()

    ids, lps = loop.out[:, : steps + 1].tolist(), loop.logprobs[:, : steps + 1].tolist()
    tokens, means, reasons = [], [], []
    for r, (row, lp) in enumerate(zip(ids, lps)):
        end, reason = ended.get(r) or ending(r, row)
        tokens.append(row[:end])
        kept = lp[: end + 1] if reason == "eos" else lp[:end]  # the EOS token's log-prob counts too
        means.append(sum(kept) / len(kept))
        reasons.append(reason)
    timed_steps = steps - warmup
    stats = dict(
        prompt_tokens=M, num_samples=n, steps=steps + 1, attention=attention, seed=seed, prefill_ms=1e3 * t_prefill,
        decode_ms_per_step=1e3 * t_decode / timed_steps if timed_steps else float("nan"),
        compile_s=t_warm if compile else 0.0, tokens_per_s=B * (steps + 1) / (t_prefill + t_warm + t_decode),
        peak_memory_gb=peak_memory_gb(device), **(dict(num_prompts=Np, prefix_tokens=Mp) if Np > 1 else {}))
    rows = lambda p, xs: xs[p * n : (p + 1) * n]  # prompt p's samples
    return [Generation(rows(p, tokens), rows(p, means), rows(p, reasons), dict(stats, prompt_tokens=Mp + lens[p]))
            for p in range(Np)]


def joined(runs: list[list[Generation]], n: int, prefix_len: int) -> list[Generation]:
    # the runs of several groups of prompts as one: their times added, the throughput over them all
    s = [run[0].stats for run in runs]
    tokens, total = [n * len(run) * x["steps"] for run, x in zip(runs, s)], lambda k: sum(x[k] for x in s)
    both = dict(s[0], steps=max(x["steps"] for x in s), num_prompts=sum(map(len, runs)), groups=len(runs),
                prefix_tokens=prefix_len, prefill_ms=total("prefill_ms"), compile_s=total("compile_s"),
                decode_ms_per_step=sum(x["decode_ms_per_step"] * x["steps"] for x in s) / total("steps"),
                tokens_per_s=sum(tokens) / sum(t / x["tokens_per_s"] for t, x in zip(tokens, s)),
                peak_memory_gb=max(x["peak_memory_gb"] for x in s))
    return [dataclasses.replace(g, stats=dict(both, prompt_tokens=g.stats["prompt_tokens"])) for run in runs for g in run]


def complete(model: Transformer, tokenizer: Optional[Tokenizer], prompt, num_samples: int = 1,
             **kwargs) -> tuple[list[dict], dict]:
    """Sample completions of one prompt (text, or a list of token ids); returns one record per
    sample, as written to --output, and the stats."""
    return complete_many(model, tokenizer, [prompt], "", num_samples, **kwargs)


def complete_many(model: Transformer, tokenizer: Optional[Tokenizer], prompts: list, prefix="",
                  num_samples: int = 1, stop: Sequence[str] = (), **kwargs) -> tuple[list[dict], dict]:
    """n completions of each prompt (text, or token ids), each placed after the shared prefix (its
    own tokenization: the prefix and each prompt are encoded apart and joined). One record per sample,
    prompt-major, with its prompt_index. A sample whose text comes to one of the stop texts ends
    there: its text is cut before it, its tokens end with the one that completes it."""
    check_stop_texts(stop)
    if stop and tokenizer is None:
        raise ValueError("stop texts need a tokenizer, and this checkpoint has none")

    def encode(text, bos: bool) -> list[int]:
        if not isinstance(text, str) or not text:
            return list(text)
        if tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: give token ids (--prompt_len N)")
        return tokenizer.encode(text, bos=bos)

    prefix_ids = encode(prefix, bos=True)
    prompt_ids = [encode(p, bos=not prefix_ids) for p in prompts]
    if len(prompts) == 1 and not prefix_ids + prompt_ids[0]:
        raise ValueError("the prompt is empty")
    eos_ids, vocab_size = (sorted(tokenizer.stop_ids), tokenizer.vocab_size) if tokenizer is not None else ((), None)
    # a sample's text: decoded after its prompt's last 8 tokens, which set its first space right, then
    # their text cut off (the whole prompt, decoded again for every sample, took 0.9 ms at 8K tokens)
    heads = [(prefix_ids + ids)[-8:] for ids in prompt_ids]

    def run(group: Sequence[int]) -> list[Generation]:
        stop_at = (lambda q, ids, since: tokenizer.stop_at(heads[group[q]], ids, stop, since)) if stop else None
        return generate_many(model, [prompt_ids[p] for p in group], prefix_ids, num_samples, eos_ids=eos_ids,
                             vocab_size=vocab_size, stop_at=stop_at, prompt_capacity=max(map(len, prompt_ids)),
                             **kwargs)

    try:
        gens = run(range(len(prompt_ids)))
    except DoesNotFit as e:  # too many prompts at once: groups that fit, one run each, the same samples
        if not e.groups:
            raise
        gens = joined([run(g) for g in e.groups], num_samples, len(prefix_ids))

    def text(p: int, toks: list[int], reason: str) -> Optional[str]:
        if tokenizer is None:
            return None
        out = tokenizer.continuation(heads[p], toks)
        found = [out.find(s) for s in stop if s in out] if reason == "stop" else []
        return out[: min(found)] if found else out

    records = [dict(prompt_index=p, sample=i, prompt_tokens=len(prefix_ids + ids), tokens=toks,
                    text=text(p, toks, fr), mean_logprob=mp, finish_reason=fr)
               for p, (ids, gen) in enumerate(zip(prompt_ids, gens))
               for i, (toks, mp, fr) in enumerate(zip(gen.tokens, gen.mean_logprob, gen.finish_reason))]
    return records, dict(gens[0].stats, prompt_tokens=max(r["prompt_tokens"] for r in records))


def check_stop_texts(stop: Sequence[str]):
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop texts must be a list of non-empty texts, got {stop!r}")


def rerank_records(records: list[dict]) -> list[dict]:
    """Best first by mean token log-probability within each prompt, each record given its `rank`
    among its prompt's samples (1 = best)."""
    out = []
    for p in sorted({r.get("prompt_index", 0) for r in records}):
        ranked = sorted((r for r in records if r.get("prompt_index", 0) == p), key=lambda r: -r["mean_logprob"])
        out += [dict(r, rank=i + 1) for i, r in enumerate(ranked)]
    return out


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


def read_prompts(prompt: Optional[str], prompt_file: Optional[str], prompt_len: Optional[int],
                 vocab_size: int) -> list:
    """--prompt: one text; --prompt_file: one prompt per line, or in a .jsonl file one JSON object
    per line with a "prompt" text (prompts of several lines); --prompt_len: random token ids."""
    given = [x is not None for x in (prompt, prompt_file, prompt_len)]
    if sum(given) != 1:
        raise ValueError("give exactly one of --prompt, --prompt_file, --prompt_len")
    if prompt_file is not None:
        lines = [line for line in read_text(prompt_file, "prompt file").splitlines() if line.strip()]
        if prompt_file.endswith(".jsonl"):
            try:
                lines = [json.loads(line)["prompt"] for line in lines]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{prompt_file}: each line must be a JSON object with a \"prompt\" ({e!r})") from None
            if not all(isinstance(t, str) and t for t in lines):
                raise ValueError(f"{prompt_file}: every \"prompt\" must be a non-empty text")
        if not lines:
            raise ValueError(f"prompt file {prompt_file} holds no prompt")
        return lines
    if prompt is not None:
        if not prompt:
            raise ValueError("the prompt is empty")
        return [prompt]
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be at least 1, got {prompt_len}")
    return [random_prompt(prompt_len, vocab_size)]


def random_prompt(prompt_len: int, vocab_size: int) -> list[int]:
    # random ids from a fixed generator: the same prompt for every run and every mode
    return torch.randint(0, vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()


def unescape(text: str) -> str:
    # "\n" typed on a command line arrives as a backslash and an n: read Python's escapes
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise ValueError(f"stop text {text!r}: {e.reason}") from None


def read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from None


def main(checkpoint_path: Optional[str], prompt: Optional[str], prompt_file: Optional[str],
         prompt_len: Optional[int], shared_prefix: Optional[str], shared_prefix_file: Optional[str],
         num_samples: int, max_new_tokens: int, temperature: float,
         top_k: Optional[int], top_p: float, seed: Optional[int], attention: str, device: Optional[str],
         dtype: Optional[str], compile: Optional[bool], rerank: bool, output: Optional[str], stop: list[str]):
    check_sampling_args(num_samples, max_new_tokens, temperature, top_k, top_p, attention)
    stop = [unescape(s) for s in stop]
    check_stop_texts(stop)
    if shared_prefix is not None and shared_prefix_file is not None:
        raise ValueError("give at most one of --shared_prefix, --shared_prefix_file")
    prefix = read_text(shared_prefix_file, "shared prefix file") if shared_prefix_file else shared_prefix or ""
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
    prompts = read_prompts(prompt, prompt_file, prompt_len, model.config.vocab_size)
    compile = dev.type == "cuda" if compile is None else compile
    records, stats = complete_many(model, tokenizer, prompts, prefix, num_samples, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p, attention=attention,
                                   compile=compile, seed=seed, progress=rank == 0, stop=stop)
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
        rank += f"prompt {r['prompt_index']}, " if "num_prompts" in stats else ""
        print(f"--- {rank}sample {r['sample']} ({r['finish_reason']}, {len(r['tokens'])} tokens, "
              f"mean logprob {r['mean_logprob']:.3f}) ---")
        print(r["text"] if r["text"] is not None else r["tokens"])
    print("--- stats ---")
    print(f"{setup}, seed {stats['seed']}")
    if "num_prompts" in stats:
        print(f"{stats['num_prompts']} prompts after a shared prefix of {stats['prefix_tokens']} tokens (longest "
              f"{stats['prompt_tokens']} tokens in all), {stats['num_samples']} samples each x {stats['steps']} steps"
              + (f", in {stats['groups']} groups of prompts that fit in memory" if "groups" in stats else ""))
    else:
        print(f"prompt {stats['prompt_tokens']} tokens, {stats['num_samples']} samples x {stats['steps']} steps")
    print(f"prefill {stats['prefill_ms']:.1f} ms | decode {stats['decode_ms_per_step']:.2f} ms/step | "
          f"{stats['tokens_per_s']:.1f} tokens/s (all samples, prefill included)"
          + (f" | compile {stats['compile_s']:.1f} s" if compile else ""))
    print(f"peak memory {stats['peak_memory_gb']:.2f} GB")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Parallel sampling from shared prompts with bifurcated attention.")
    p.add_argument("--checkpoint_path", default=str(DEFAULT_CHECKPOINT),
                   help="converted checkpoint (file or directory), or synthetic:NAME (default: the shipped tiny code model)")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt_file", help="prompts, one per line (.jsonl: one {\"prompt\": ...} object per line)")
    p.add_argument("--prompt_len", type=int, help="random prompt of this many token ids (no tokenizer needed)")
    p.add_argument("--shared_prefix", help="text placed before every prompt, stored and read once")
    p.add_argument("--shared_prefix_file", help="read the shared prefix from this file")
    p.add_argument("--num_samples", type=int, default=1, help="samples of each prompt")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens decoded per sample (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k likeliest tokens (default: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling's probability mass (default 1.0: all)")
    p.add_argument("--seed", type=int, default=None, help="default: a fresh seed, printed in the stats")
    p.add_argument("--attention", default="bifurcated", help="bifurcated (default) or standard")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile + CUDA graphs for the decode step (default: on for cuda, off for cpu)")
    p.add_argument("--stop", nargs="+", default=[], metavar="TEXT",
                   help="end a sample where its text comes to one of these (cut before it); Python escapes: '\\n'")
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
