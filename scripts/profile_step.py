# Where the time of one decode step goes: generate.py's compiled, CUDA-graphed step (its DecodeLoop) run a
# number of times under torch.profiler, GPU time per kernel per step, largest first. With --prefill,
# the same for the prefill of a `--context`-token prompt (eager, as generate.py runs it first), and its
# wall time, eager and replayed as the CUDA graph that generate.py records for short prompts.
#
#   python scripts/profile_step.py --model Llama-2-7B --context 8192 --num_samples 32
#   python scripts/profile_step.py --context 1024 --prefill
#   python scripts/profile_step.py --many 16 4096 512 --num_samples 32 --at 60   (several prompts, from step 64)
#   python scripts/profile_step.py --weights int4 --context 1024 --num_samples 1 --variant int4-gemv
#   (a variant of scripts/ab_step.py's, with Inductor's caches off, as there)
import time
import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `import generate` as a script

import torch
from torch.profiler import ProfilerActivity, profile

import ab_step
import quantize
from bifurcated import make_caches
from compiled import CUDAGraphStep, DecodeLoop, prefill_step
from generate import generate_many, load_model, random_prompt, resolve_device
from sampling import next_tokens


@torch.no_grad()
def main(model: str, context: int, num_samples: int, attention: str, steps: int, compile: bool, top: int,
         trace: str | None, prefill: bool, weights: str, many: list[int] | None, at: int):
    dev = resolve_device(None)
    m, _ = load_model("synthetic:" + model, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if weights != "bf16":  # the same random weights, quantized as scripts/benchmark.py does
        m = quantize.quantize_model(m, weights, 128 if weights == "int4" else None)
        model = f"{model} {weights}"
    cfg, n, T = m.config, num_samples, at + steps + 8
    if many:  # generate.py's own run sets up the three-level caches and the loop; then from its start again
        P, Mp, L = many
        prompts = [random_prompt(L, cfg.vocab_size) for _ in range(P)]
        generate_many(m, prompts, random_prompt(Mp, cfg.vocab_size), n, T, compile=compile, seed=0)
        loop, pos = m.last_run[2], torch.full((P * n, 1), Mp + L, device=dev)
        title = f"{model}, {P} prompts of {L} tokens after a prefix of {Mp}, n {n}"
    else:
        m.setup(context + T, make_caches(attention, cfg, n, context, T, m.output.weight.dtype, dev))
        prompt = torch.tensor(random_prompt(context, cfg.vocab_size), device=dev)[None]  # (1, M)
        m(prompt, torch.arange(context, device=dev), last_only=True)  # prefill: fills the context cache
        if prefill:
            return profile_prefill(m, prompt, model, steps, top, trace)
        sampling = dict(temperature=0.8, top_k=None, top_p=1.0, vocab_size=cfg.vocab_size)
        pos = torch.tensor(context, device=dev)
        loop = DecodeLoop(m, functools.partial(next_tokens, **sampling), n, T, pos, compile)  # as generate.py runs it
        title = f"{model}, context {context}, n {num_samples}, {attention}"
    loop.start(torch.zeros(len(loop.out), dtype=torch.long, device=dev), torch.zeros(len(loop.out), device=dev), pos)
    for _ in range(4 + at):  # compilation and CUDA-graph recording, outside the profile; then `at` steps in
        loop.advance()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            loop.advance()
        torch.cuda.synchronize()
    report(prof, title + (f", from step {4 + at}" if at else ""), "step", steps, top, trace)


def profile_prefill(m, prompt, model: str, steps: int, top: int, trace: str | None):
    pos = torch.arange(prompt.shape[1], device=prompt.device)
    graph = prefill_step(m, prompt.shape[1], compile=True)  # generate.py's: a CUDA graph for short prompts
    graph(prompt), graph(prompt)  # runs it, then records it
    runs = [("eager", lambda: m(prompt, pos, last_only=True))]
    for name, run in runs + ([("CUDA graph", lambda: graph(prompt))] if isinstance(graph, CUDAGraphStep) else []):
        walls = []
        for _ in range(steps):  # wall time, host included
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
        print(f"prefill wall time, {name}: median {1e3 * sorted(walls)[len(walls) // 2]:.1f} ms of {steps} "
              f"(min {1e3 * min(walls):.1f}, max {1e3 * max(walls):.1f})")
    del graph
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            m(prompt, pos, last_only=True)
        torch.cuda.synchronize()
    report(prof, f"{model}, prefill of {prompt.shape[1]} tokens", "prefill", steps, top, trace)


def report(prof, title: str, unit: str, steps: int, top: int, trace: str | None):
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in kernels)
    print(f"{title}: {total / steps / 1e3:.2f} ms of GPU time per {unit}")
    print(f"| kernel | us per {unit} | share | calls per {unit} |\n|---|---|---|---|")
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:top]:
        print(f"| {e.key[:90]} | {e.device_time_total / steps:.1f} | {100 * e.device_time_total / total:.1f}% "
              f"| {e.count / steps:.1f} |")
    if trace:
        prof.export_chrome_trace(trace)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="GPU time per kernel of one decode step.")
    p.add_argument("--model", default="Llama-2-7B")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--num_samples", type=int, default=32)
    p.add_argument("--attention", default="bifurcated")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", help="also write a Chrome trace here")
    p.add_argument("--prefill", action="store_true", help="profile the prefill of the prompt instead")
    p.add_argument("--weights", choices=["bf16", "int8", "int4"], default="bf16", help="int4: groups of 128")
    p.add_argument("--many", nargs=3, type=int, metavar=("PROMPTS", "PREFIX", "TOKENS"),
                   help="several prompts of TOKENS random tokens after a shared PREFIX, n samples each")
    p.add_argument("--at", type=int, default=0,
                   help="run this many more steps before the profile (after 4 for compiling): the own tokens filled")
    p.add_argument("--variant", choices=list(ab_step.VARIANTS), default="main",
                   help="profile this variant of the code (scripts/ab_step.py's)")
    args = vars(p.parse_args())
    if args["many"] and (args["prefill"] or args["attention"] != "bifurcated"):
        p.error("--many profiles the bifurcated decode step only (no --prefill, no other --attention)")
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        sys.exit(1)
    variant = args.pop("variant")
    if variant == "main":
        main(**args)
    else:  # Inductor's caches off: a compiled step from them could be another variant's (ab_step.py)
        print(f"variant {variant}")
        with ab_step.caches_off():
            ab_step.with_variant(variant, lambda: main(**args))
