# Decode speed of parallel sampling on synthetic-weight models, set against the floor of PERF.md:
# the bytes a step must read over the read bandwidth, or its flops over the matmul rate, both
# measured in the same run. Sweeps model x context M x samples n x attention and writes
# bench/results/<gpu>/<tag>.json (every number + command line), .md (a table) and .png (a plot).
#
#   python scripts/benchmark.py                      # the PERF.md sweep on this machine's GPU
#   python scripts/benchmark.py --table --tag table  # the README's table, its rows only, in one process
#   python scripts/benchmark.py --models Mistral-7B --contexts 8192 --samples 1 32 --tag mistral
#   torchrun --standalone --nproc_per_node=2 scripts/benchmark.py --tag sweep   # tensor parallel: sweep-tp2
#   python scripts/benchmark.py --merge a.json b.json --tag all          # one table + plot from earlier runs
import argparse
import datetime
import functools
import gc
import itertools
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `import generate` as a script

import torch
import torch.nn as nn

import generate
import quantize
import sampling
import tp
from bifurcated import DoesNotFit
from model import ModelArgs

QUANT_GROUPSIZE = {"int4": 128}
E2E_PROMPT, E2E_NEW_TOKENS = 1024, 256  # PERF.md target: n = 1, 1K prompt, 256 new tokens, prefill included
# The rate measurements: a read pass far larger than any cache, a matmul large enough to reach the
# peak rate. Smaller on CPU, where the same code path only has to run, not to be a reference.
RATE_SIZES = {"cuda": dict(read_bytes=4 << 30, matmul_size=8192), "cpu": dict(read_bytes=256 << 20, matmul_size=1024)}
# The README's table (PERF.md's targets): (model, context, n, attention), run in this order
TABLE = ([("Llama-2-7B", 8192, n, "bifurcated") for n in (1, 8, 32, 64, 256, 512)]
         + [("Llama-2-7B", 8192, n, "standard") for n in (8, 32)]
         + [("Llama-2-7B", M, 32, "bifurcated") for M in (16384, 32768)] + [("Mistral-7B", 8192, 32, "bifurcated")])


# ---------------------------------------------------------------------------------------------
# The floor
def best_seconds(fn, device: torch.device, repeats: int = 10) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(device))
            fn()
            end.record(torch.cuda.current_stream(device))
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def measure_rates(device: torch.device, dtype: torch.dtype, read_bytes: int, matmul_size: int) -> tuple[float, float]:
    """(read bandwidth in bytes/s, matmul rate in flop/s), each the best of several passes."""
    x = torch.ones(read_bytes // dtype.itemsize, dtype=dtype, device=device)
    read_bw = x.numel() * x.element_size() / best_seconds(x.sum, device)
    del x
    a, b = (torch.randn(matmul_size, matmul_size, dtype=dtype, device=device) for _ in range(2))
    matmul_rate = 2 * matmul_size**3 / best_seconds(lambda: a @ b, device)
    del a, b
    release(device, compiled=False)
    return read_bw, matmul_rate


def linear_params(model: nn.Module) -> int:
    # every linear layer (cuBLAS's or linear_triton's) and the output head: the 2-D weights but the
    # embedding, which a step reads only n rows of
    return sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and name != "tok_embeddings.weight")


def weight_bytes(model: nn.Module) -> int:
    # what a step reads of the weights, quantized or not (scales included): all but the embedding, and
    # one of the two copies of an int4 weight (quantize.Int4Linear.tinygemm: PyTorch's layout, read
    # instead of `weight` at 1 row)
    tensors = [*model.parameters(), *(b for name, b in model.named_buffers() if not name.endswith(".tinygemm"))]
    return sum(t.numel() * t.element_size() for t in tensors) - model.tok_embeddings.weight.nbytes


def step_cost(config: ModelArgs, params_linear: int, attention: str, n: int, M: int, T: int,
              bytes_per_elem: int, weights_read: Optional[int] = None, attended: Optional[int] = None) -> tuple[float, float]:
    """(bytes, flops) one decode step must at least read and compute, its attended decode tokens
    averaged over the T new ones (T / 2 per sample). weights_read: the weights' bytes when they are
    not params_linear elements of bytes_per_elem each (quantized). attended: the context tokens each
    row attends to when it is not M, the tokens stored (several prompts)."""
    L, H, Hkv, D = config.n_layer, config.n_head, config.n_kv_heads, config.head_dim
    kv_per_token = 2 * L * Hkv * D * bytes_per_elem  # K and V of one token in every layer
    context = kv_per_token * M * (n if attention == "standard" else 1)  # standard reads each row's copy
    decode = kv_per_token * n * T / 2
    nbytes = (params_linear * bytes_per_elem if weights_read is None else weights_read) + context + decode
    flops = 2 * params_linear * n + 4 * L * H * D * n * ((attended or M) + T / 2)  # q.k, p.v over its keys
    return nbytes, flops


# ---------------------------------------------------------------------------------------------
# Measuring
def load_synthetic(name: str, kind: str, device: torch.device, dtype: torch.dtype, shard=None):
    """A named config's random weights, quantized as quantize.py does a checkpoint unless kind is bf16, and
    measure's size of it: (linear parameters, bytes of the weights read per step, None: bf16)."""
    model, _ = generate.load_model("synthetic:" + name, device, dtype, shard)
    size = (linear_params(model), None)
    if kind != "bf16":
        model = quantize.quantize_model(model, kind, QUANT_GROUPSIZE.get(kind))
        size = (size[0], weight_bytes(model))
    return model, size


def release(device: torch.device, compiled: bool):
    # A configuration's compiled graphs and their CUDA-graph memory pool go with it (generate drops
    # its caches itself when the next run sets up); the next one compiles for its own shapes.
    if compiled:
        torch.compiler.reset()
    if device.type == "cuda":  # compiled graphs hold tensors in reference cycles
        gc.collect()
        torch.cuda.empty_cache()


def measure(model, name: str, attention: str, n: int, M: int, T: int, compile: bool, repeats: int,
            rates: tuple[float, float], weights: str = "bf16", size: tuple[int, Optional[int]] = None) -> dict:
    # size: (linear parameters, bytes of the weights read per step, None: bf16), from the loaded model
    dtype = model.output.weight.dtype
    plan = generate.plan_memory(model.config, attention, n, M, T, dtype)
    row = dict(kind="decode", model=name, context=M, n=n, attention=attention, weights=weights, max_new_tokens=T,
               predicted_gb=plan["total"] / 1e9, oom=False)
    prompt = generate.random_prompt(M, model.config.vocab_size)  # generate.py's --prompt_len prompt
    runs = timed_runs(row, model, compile, repeats, lambda: generate.generate(
        model, prompt, num_samples=n, max_new_tokens=T, temperature=0.8, attention=attention, compile=compile, seed=0))
    params, weights_read = size or (linear_params(model), None)
    return with_floor(row, runs, *step_cost(model.config, params, attention, n, M, T, dtype.itemsize, weights_read),
                      rates)


def timed_runs(row: dict, model, compile: bool, repeats: int, run) -> list[dict]:
    """Each run's stats; none, and the row marked, when it does not fit."""
    runs = []
    try:
        for _ in range(repeats):
            runs.append(run().stats)
    except DoesNotFit:  # the memory planner's prediction, before anything is allocated
        row.update(oom=True)
    except torch.OutOfMemoryError:  # the plan said it fits, the allocator disagreed
        row.update(oom=True, crashed=True)
    release(model.output.weight.device, compile)
    return runs


def with_floor(row: dict, runs: list[dict], nbytes: float, flops: float, rates: tuple[float, float]) -> dict:
    if row["oom"]:
        return row
    ms = statistics.median(r["decode_ms_per_step"] for r in runs)
    read_ms, matmul_ms = 1e3 * nbytes / rates[0], 1e3 * flops / rates[1]
    floor_ms = max(read_ms, matmul_ms)
    return dict(row, ms_per_step=ms, ms_per_step_runs=[r["decode_ms_per_step"] for r in runs],
                prefill_ms=statistics.median(r["prefill_ms"] for r in runs),
                peak_memory_gb=max(r["peak_memory_gb"] for r in runs),
                compile_s=runs[0]["compile_s"],  # the first run compiles; later ones find it warm
                compile_s_runs=[r["compile_s"] for r in runs],
                bytes_per_step_gb=nbytes / 1e9, tflop_per_step=flops / 1e12, floor_ms=floor_ms,
                bound="memory" if read_ms >= matmul_ms else "compute", pct_of_floor=100 * floor_ms / ms,
                achieved_gbps=nbytes / ms / 1e6)


MANY_MODES = ("three-level", "one-level", "standard")


def measure_many(model, name: str, prompts: int, prefix_len: int, prompt_len: int, mode: str, n: int, T: int,
                 compile: bool, repeats: int, rates: tuple[float, float], weights: str = "bf16",
                 size: tuple[int, Optional[int]] = None) -> dict:
    """Several prompts after a shared prefix. three-level: the prefix stored once (PrefixCache);
    one-level: the prefix copied into each prompt's own level; standard: every row its own copy of
    prefix + prompt (the plain batched engine; planned only, as several prompts run bifurcated)."""
    device, dtype, cfg = model.output.weight.device, model.output.weight.dtype, model.config
    B, M = prompts * n, prefix_len + prompt_len
    stored = {"three-level": prefix_len + prompts * prompt_len, "one-level": prompts * M, "standard": B * M}[mode]
    plan = generate.plan_memory(cfg, "bifurcated", B, stored, T, dtype)
    row = dict(kind="many", model=name, prompts=prompts, prefix=prefix_len, prompt_tokens=prompt_len, n=n,
               attention=mode, weights=weights, max_new_tokens=T, predicted_gb=plan["total"] / 1e9, oom=False)
    if mode == "standard":
        free = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else float("inf")
        return dict(row, oom=plan["total"] > free, measured=False)
    prefix = generate.random_prompt(prefix_len, cfg.vocab_size)
    texts = [torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1 + p)).tolist()
             for p in range(prompts)]
    if mode == "one-level":
        prefix, texts = [], [prefix + t for t in texts]
    runs = timed_runs(row, model, compile, repeats, lambda: generate.generate_many(
        model, texts, prefix, num_samples=n, max_new_tokens=T, temperature=0.8, compile=compile, seed=0)[0])
    params, weights_read = size or (linear_params(model), None)
    cost = step_cost(cfg, params, "bifurcated", B, stored, T, dtype.itemsize, weights_read, attended=M)
    return with_floor(row, runs, *cost, rates)


def measure_e2e(model, name: str, compile: bool, repeats: int, weights: str = "bf16") -> dict:
    prompt = generate.random_prompt(E2E_PROMPT, model.config.vocab_size)
    kwargs = dict(num_samples=1, max_new_tokens=E2E_NEW_TOKENS, temperature=0.8, eos_ids=(), compile=compile, seed=0)
    for _ in range(2):  # warm-up: compilation, then the CUDA graphs' recording (the prefill's at its second run)
        generate.generate(model, prompt, **kwargs)
    totals = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stats = generate.generate(model, prompt, **kwargs).stats  # returns synced: its tokens are on the host
        totals.append(time.perf_counter() - t0)
    release(model.output.weight.device, compile)
    total = statistics.median(totals)
    return dict(kind="e2e", model=name, context=E2E_PROMPT, n=1, attention="bifurcated", weights=weights,
                max_new_tokens=E2E_NEW_TOKENS,
                total_s=total, total_s_runs=totals, tokens_per_s=E2E_NEW_TOKENS / total,
                prefill_ms=stats["prefill_ms"], ms_per_step=stats["decode_ms_per_step"],
                peak_memory_gb=stats["peak_memory_gb"])


# ---------------------------------------------------------------------------------------------
# Reporting
def gpu_slug(device_name: str) -> str:
    # "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-").removeprefix("nvidia-")


def md_row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


DECODE_COLUMNS = ("model", "context", "n", "attention", "weights", "ms/step", "floor ms", "% of floor", "GB/s", "peak GB",
                  "prefill ms", "compile s")
E2E_COLUMNS = ("model", "weights", "prompt", "new tokens", "tokens/s", "total s", "prefill ms", "ms/step")
DECODE_HEADER = [md_row(*DECODE_COLUMNS), md_row(*["---"] * len(DECODE_COLUMNS))]
E2E_HEADER = [md_row(*E2E_COLUMNS), md_row(*["---"] * len(E2E_COLUMNS))]
MANY_COLUMNS = ("model", "prompts x n", "prefix + prompt tokens", "cache", "weights", *DECODE_COLUMNS[5:])
MANY_HEADER = [md_row(*MANY_COLUMNS), md_row(*["---"] * len(MANY_COLUMNS))]


def table_row(r: dict) -> str:
    if r["kind"] == "e2e":
        return md_row(r["model"], r["weights"], r["context"], r["max_new_tokens"], f"{r['tokens_per_s']:.1f}",
                      f"{r['total_s']:.2f}", f"{r['prefill_ms']:.1f}", f"{r['ms_per_step']:.2f}")
    if r["kind"] == "many":
        head = (r["model"], f"{r['prompts']} x {r['n']}", f"{r['prefix']} + {r['prompt_tokens']}", r["attention"],
                r["weights"])
        if not r.get("measured", True) and not r["oom"]:
            return md_row(*head, f"not run (predicted {r['predicted_gb']:.1f} GB)", *[""] * 6)
    else:
        head = (r["model"], r["context"], r["n"], r["attention"], r["weights"])
    if r["oom"]:
        return md_row(*head, f"OOM (predicted {r['predicted_gb']:.1f} GB)", *[""] * 6)
    return md_row(*head, f"{r['ms_per_step']:.2f}", f"{r['floor_ms']:.2f}", f"{r['pct_of_floor']:.0f}%",
                  f"{r['achieved_gbps']:.0f}", f"{r['peak_memory_gb']:.1f}", f"{r['prefill_ms']:.1f}",
                  f"{r['compile_s']:.1f}")


def setting(result: dict) -> str:
    return (f"torch {result['torch']}, {result['date']}, {result['dtype']}, "
            f"{'compiled' if result['compile'] else 'eager'}, {result['max_new_tokens']} new tokens, median of "
            f"{result['repeats']} runs. Measured in this run: read bandwidth "
            f"{result['read_bandwidth_gbps']:.0f} GB/s, matmul {result['matmul_tflops']:.1f} TFLOP/s.")


def markdown(result: dict) -> str:
    if "sources" in result:  # merged: each run's setting and command
        head = ["Rows from these runs, each against the rates measured in it:", ""]
        head += [f"- `{src['command']}`: {setting(src)}" for src in result["sources"]]
    else:
        head = [setting(result), "", f"`{result['command']}`"]
    lines = [f"# Decode benchmark: {result['gpu']}", "", *head]
    decode = [table_row(r) for r in result["rows"] if r["kind"] == "decode"]
    if decode:
        lines += ["", *DECODE_HEADER, *decode]
    many = [table_row(r) for r in result["rows"] if r["kind"] == "many"]
    if many:
        lines += ["", "Several prompts after a shared prefix:", "", *MANY_HEADER, *many]
    e2e = [table_row(r) for r in result["rows"] if r["kind"] == "e2e"]
    if e2e:
        lines += ["", "End to end, one sample, prefill included:", "", *E2E_HEADER, *e2e]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str):
    # a temporary file in the same directory, renamed: a killed run never leaves half a file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def plot(path: Path, result: dict) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    lines = {}  # (model, context, attention, weights) -> [(n, ms/step)]
    for r in result["rows"]:
        if r["kind"] == "decode" and not r["oom"]:
            key = (r["model"], r["context"], r["attention"], r.get("weights", "bf16"))
            lines.setdefault(key, []).append((r["n"], r["ms_per_step"]))
    colors = {}  # one colour per (model, context): its bifurcated and standard lines side by side
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for (name, M, attention, weights), points in sorted(lines.items()):
        color = colors.setdefault((name, M, weights), f"C{len(colors) % 10}")
        ns, ms = zip(*sorted(points))
        ax.plot(ns, ms, marker="o", color=color, linestyle="--" if attention == "standard" else "-",
                label=f"{name}{'' if weights == 'bf16' else ' ' + weights}, {M} context, {attention}")
    ax.set(xscale="log", yscale="log", xlabel="samples n", ylabel="ms per decode step",
           title=f"{result['gpu']}, {result['dtype']}, {result['max_new_tokens']} new tokens")
    ax.set_xticks(sorted({n for points in lines.values() for n, _ in points}))
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 5, 10, 20, 50 ms: readable on a short axis
    for axis in (ax.xaxis, ax.yaxis):  # 32, not 3.2 x 10^1
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def config_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("kind", "model", "weights", "context", "n", "attention", "prompt_tokens",
                                      "max_new_tokens", "prompts", "prefix"))


def merge(files: list[str], out_dir: str, tag: str) -> Path:
    """One table and one plot from the rows of several runs on one GPU (a sweep too long for one sitting);
    where two files measured the same configuration, the later file's row is kept."""
    results = [json.loads(Path(f).read_text()) for f in files]
    gpus = sorted({r["gpu"] for r in results})
    if len(gpus) != 1:
        raise ValueError(f"results from more than one GPU: {', '.join(gpus)}")
    # a merged file brings the runs it was made from
    sources = [s for r in results for s in r.get("sources", [{k: v for k, v in r.items() if k != "rows"}])]
    rows = {}  # a configuration measured again in a later file replaces the earlier row
    for row in (row for r in results for row in r["rows"]):
        rows.pop(config_key(row), None)
        rows[config_key(row)] = row
    result = dict(gpu=gpus[0], command=shlex.join(["python"] + sys.argv), sources=sources,
                  dtype=results[0]["dtype"], max_new_tokens=results[0]["max_new_tokens"], rows=list(rows.values()))
    stem = Path(out_dir) / gpu_slug(gpus[0]) / tag
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    write_atomic(stem.with_suffix(".md"), markdown(result))
    print(f"wrote {stem}.json and {stem}.md" + (f" and {stem}.png" if plot(stem.with_suffix(".png"), result) else ""))
    return stem


# ---------------------------------------------------------------------------------------------
# CLI
def main(models: list[str], contexts: list[int], samples: list[int], attention: list[str], max_new_tokens: int,
         repeats: int, out_dir: str, tag: str, device: str, dtype: str, compile: bool, e2e: bool,
         weights: Sequence[str] = ("bf16",), many: Optional[list[int]] = None,
         configs: Optional[Sequence[tuple[str, int, int, str]]] = None):
    # configs: (model, context, n, attention) to run instead of models x contexts x samples x attention
    if configs is not None and many:
        raise ValueError("--table runs single prompts: it does not take --many")
    if configs is None:
        configs = list(itertools.product(models, contexts, samples, attention))
    models = list(dict.fromkeys(c[0] for c in configs))  # each model built once
    for name, M, n, mode in configs:
        ModelArgs.from_name(name)  # an unknown name fails here, before an hour of measuring
        sampling.check_sampling_args(n, max_new_tokens, 0.8, None, 1.0, mode)
        if M < 1:
            raise ValueError("contexts must be at least 1")
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    if not re.fullmatch(r"[\w.-]+", tag):
        raise ValueError(f"tag {tag!r} must be a plain file name (letters, digits, '.', '_', '-')")
    dev = generate.resolve_device(device)
    rank, world, _ = tp.world_info()  # under torchrun: tensor parallel, the floor per GPU, rank 0 reports
    if world > 1:
        dev = tp.init_distributed(dev)
        tag = f"{tag}-tp{world}"
    torch_dtype = generate.resolve_dtype(dtype, dev)
    compile = dev.type == "cuda" if compile is None else compile
    e2e = dev.type == "cuda" if e2e is None else e2e
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    stem = Path(out_dir) / gpu_slug(gpu) / tag
    if rank == 0:
        stem.parent.mkdir(parents=True, exist_ok=True)

    read_bw, matmul_rate = measure_rates(dev, torch_dtype, **RATE_SIZES[dev.type])
    say = print if rank == 0 else lambda *args, **kwargs: None
    say(f"{gpu}: read {read_bw / 1e9:.0f} GB/s, matmul {matmul_rate / 1e12:.1f} TFLOP/s ({torch_dtype})", flush=True)
    result = dict(command=shlex.join(["python"] + sys.argv), argv=sys.argv, torch=torch.__version__, gpu=gpu,
                  device=str(dev), tp=world, dtype=str(torch_dtype).removeprefix("torch."), compile=compile,
                  max_new_tokens=max_new_tokens, repeats=repeats,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  read_bandwidth_gbps=read_bw / 1e9, matmul_tflops=matmul_rate / 1e12,
                  rate_sizes=RATE_SIZES[dev.type], rows=[])
    total, done = len(weights) * len(configs), 0

    def record(row: dict, prefix: str):
        if rank:
            return
        print(f"{prefix} {table_row(row)}", flush=True)  # a killed run keeps every row measured so far
        result["rows"].append(row)
        write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
        write_atomic(stem.with_suffix(".md"), markdown(result))

    for name, kind in itertools.product(models, weights):
        shard = functools.partial(tp.apply_tp, rank=rank, world=world) if world > 1 else None
        model, size = load_synthetic(name, kind, dev, torch_dtype, shard)
        if e2e:
            say("\n".join(E2E_HEADER))
            record(measure_e2e(model, name, compile, repeats, kind), "[e2e]")
        say("\n".join(MANY_HEADER if many else DECODE_HEADER))
        for n, mode in itertools.product(samples, MANY_MODES) if many else ():  # several prompts instead
            row = measure_many(model, name, *many, mode, n, max_new_tokens, compile, repeats, (read_bw, matmul_rate),
                               kind, size)
            record(row, "[many]")
        for _, M, n, mode in [c for c in configs if c[0] == name] if not many else ():
            done += 1
            row = measure(model, name, mode, n, M, max_new_tokens, compile, repeats, (read_bw, matmul_rate), kind,
                          size)
            record(row, f"[{done}/{total}]")
        del model
        release(dev, compiled=False)
    if rank:
        return
    print(f"wrote {stem}.json and {stem}.md")
    if plot(stem.with_suffix(".png"), result):
        print(f"wrote {stem}.png")
    else:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Decode speed of parallel sampling against the memory-bandwidth floor.")
    p.add_argument("--models", nargs="+", default=["Llama-2-7B"], help="named configs, random weights")
    p.add_argument("--contexts", nargs="+", type=int, default=[8192, 16384, 32768], help="prompt lengths M")
    p.add_argument("--samples", nargs="+", type=int, default=[1, 8, 32, 64, 256, 512], help="numbers of samples n")
    p.add_argument("--attention", nargs="+", default=["bifurcated", "standard"])
    p.add_argument("--many", nargs=3, type=int, metavar=("PROMPTS", "PREFIX", "TOKENS"),
                   help="several prompts instead: PROMPTS random prompts of TOKENS tokens after a PREFIX-token "
                        "shared prefix, n samples each, three-level vs one-level cache (and standard, planned)")
    p.add_argument("--weights", nargs="+", default=["bf16"], choices=["bf16", "int8", "int4"],
                   help="bf16, or the same weights quantized (int8; int4 in groups of 128)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens decoded per sample (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; the median is reported")
    p.add_argument("--out_dir", default="bench/results", help="results go to OUT_DIR/<gpu>/<tag>.{json,md,png}")
    p.add_argument("--tag", default="sweep", help="the results' file name (default sweep)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile + CUDA graphs for the decode step (default: on for cuda, off for cpu)")
    p.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=None,
                   help=f"also time n=1, {E2E_PROMPT}-token prompt, {E2E_NEW_TOKENS} new tokens end to end, "
                        "prefill included (default: on for cuda)")
    p.add_argument("--table", action="store_true",
                   help="instead of --models, --contexts, --samples and --attention: the README table's rows "
                        "(Llama-2-7B 8K n = 1 ... 512, standard at n = 8 and 32, 16K and 32K at n = 32; "
                        "Mistral-7B 8K n = 32), each model built once")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="measure nothing: one table and plot (OUT_DIR/<gpu>/TAG) from these results of earlier runs")
    args = p.parse_args()
    try:
        if args.merge:
            merge(args.merge, args.out_dir, args.tag)
        else:
            main(**{k: v for k, v in vars(args).items() if k not in ("merge", "table")},
                 configs=TABLE if args.table else None)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    tp.exit_distributed()  # after success only: its barrier would wait forever for a rank that failed alone
