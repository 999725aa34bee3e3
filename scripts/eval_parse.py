# How often do sampled function bodies parse? Takes the signature lines of module-level functions
# in the held-out files of a model's split.json (read from this interpreter's standard library),
# samples N completions of each, cuts every completion where the function ends, and asks
# ast.parse. Reports the share that parse among all N samples and among the --top samples with
# the highest mean log-probability (re-ranking).
#
#   python scripts/eval_parse.py --checkpoint_path models/tiny-code --num_samples 32 --output parse.json
import argparse
import ast
import json
import platform
import sys
import sysconfig
import tokenize
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `import generate` as a script

import torch

import checkpoint
import generate
import sampling

SPLIT_FILE = "split.json"


# ---------------------------------------------------------------------------------------------
# Signatures
def first_function(path: Path, taken: set[str]) -> Optional[tuple[str, str]]:
    # The first module-level `def` in the file whose signature is one whole line and whose body
    # has at least 3 lines; decorated ones are left out (the prompt would lack the decorator).
    try:
        with tokenize.open(path) as f:  # honours a coding cookie; newlines become "\n"
            source = f.read()
        tree = ast.parse(source)
    except (OSError, SyntaxError, ValueError):  # the stdlib has deliberately broken test files
        return None
    lines = source.split("\n")  # not splitlines(): it also splits at form feeds, which ast does not count
    for node in tree.body:
        if (not isinstance(node, ast.FunctionDef) or node.decorator_list or node.name in taken
                or node.name.startswith(("test", "_test"))
                or node.body[0].lineno == node.lineno or node.end_lineno - node.lineno < 3):
            continue
        line = lines[node.lineno - 1]
        try:  # the header is complete on its line (not continued inside its parentheses)
            ast.parse(line + "\n    pass\n")
        except SyntaxError:
            continue
        return node.name, line
    return None


def pick_signatures(stdlib_dir, relpaths, k: int) -> list[tuple[str, str]]:
    """(relpath, signature line) for up to k functions of distinct names, one per file, files in
    sorted order. Files that are missing or do not parse are passed over."""
    picked, taken = [], set()
    for rel in sorted(relpaths):
        if len(picked) == k:
            break
        found = first_function(Path(stdlib_dir) / rel, taken)
        if found is not None:
            taken.add(found[0])
            picked.append((rel, found[1]))
    return picked


# ---------------------------------------------------------------------------------------------
# Closing a sampled function
def function_body(completion: str, finished: bool) -> tuple[str, bool]:
    # The body ends before the first non-blank line at column 0. A sample that never got there
    # and ran out of tokens (finished=False) was cut inside its last line, so that line goes too;
    # one that ended with EOS (finished=True) ended the file where it meant to, so it is kept.
    # Also returns whether the function ended (a column-0 line or EOS) within the sample.
    lines = completion.split("\n")
    for i, line in enumerate(lines):
        # indentation is what Python counts as whitespace: space, tab, form feed (not str.isspace())
        if line.strip(" \t\x0c\r") and not line.startswith((" ", "\t", "\x0c")):
            return "\n".join(lines[:i]), True
    return "\n".join(lines if finished else lines[:-1]), finished


def parses(signature: str, completion: str, finished: bool) -> bool:
    """signature: the def line (with or without its newline); completion: the text sampled after it;
    finished: the sample ended with EOS rather than at max_new_tokens."""
    body, _ = function_body(completion, finished)
    if not body.strip():
        return False
    try:
        ast.parse(signature.rstrip("\n") + "\n" + body)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: null bytes
        return False
    return True


# ---------------------------------------------------------------------------------------------
# CLI
def read_held_out(split_path: Path) -> tuple[list[str], dict]:
    if not split_path.is_file():
        raise FileNotFoundError(f"{SPLIT_FILE} not found beside the checkpoint: {split_path}")
    try:
        split = json.loads(split_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {split_path}: {e}") from None
    held_out = split.get("held_out") if isinstance(split, dict) else None
    if not isinstance(held_out, list) or not all(isinstance(p, str) for p in held_out):
        raise ValueError(f"{split_path} has no list of paths under \"held_out\"")
    return held_out, split


def rate(parsed: int, total: int) -> str:
    return f"{parsed}/{total} ({100 * parsed / total:.1f}%)"


def main(checkpoint_path: str, num_signatures: int, num_samples: int, temperature: float, max_new_tokens: int,
         top: int, seed: int, device: Optional[str], output: Optional[str]):
    sampling.check_sampling_args(num_samples, max_new_tokens, temperature, None, 1.0, "bifurcated")
    if num_signatures < 1:
        raise ValueError(f"num_signatures must be at least 1, got {num_signatures}")
    if not 1 <= top <= num_samples:
        raise ValueError(f"top must be between 1 and num_samples ({num_samples}), got {top}")
    if output is not None and not Path(output).parent.is_dir():
        raise ValueError(f"output directory does not exist: {Path(output).parent}")
    ckpt = Path(checkpoint_path)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    split_path = (ckpt if ckpt.is_dir() else ckpt.parent) / SPLIT_FILE
    held_out, split = read_held_out(split_path)

    stdlib = sysconfig.get_paths()["stdlib"]
    present = [p for p in held_out if (Path(stdlib) / p).is_file()]
    print(f"{len(held_out)} held-out files (split made on Python {split.get('python', '?')}); "
          f"{len(held_out) - len(present)} missing from this Python's ({platform.python_version()}) "
          f"stdlib {stdlib}, skipped")
    signatures = pick_signatures(stdlib, present, num_signatures)
    if not signatures:
        raise ValueError("no held-out file has a module-level function to complete")
    if len(signatures) < num_signatures:
        print(f"only {len(signatures)} of {num_signatures} signatures found")
    print("signatures:")
    for rel, line in signatures:
        print(f"  {rel}: {line}")

    dev = generate.resolve_device(device)
    model, tokenizer = generate.load_model(checkpoint_path, dev, dtype=torch.float32)
    if tokenizer is None:
        raise ValueError(f"no {checkpoint.TOKENIZER_FILE} beside the checkpoint {checkpoint_path}")
    results = []
    for i, (rel, line) in enumerate(signatures):
        prompt = line + "\n"
        records, _ = generate.complete(model, tokenizer, prompt, num_samples=num_samples,
                                       max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i)
        samples = []
        for r in records:
            completion, finished = r["text"], r["finish_reason"] == "eos"
            samples.append(dict(sample=r["sample"], parsed=parses(line, completion, finished),
                                ended=function_body(completion, finished)[1], mean_logprob=r["mean_logprob"],
                                finish_reason=r["finish_reason"], completion=completion))
        ranked = sorted(samples, key=lambda s: -s["mean_logprob"])[:top]  # stable: ties keep sample order
        parsed, top_parsed = sum(s["parsed"] for s in samples), sum(s["parsed"] for s in ranked)
        ended = sum(s["ended"] for s in samples)
        results.append(dict(file=rel, signature=line, seed=seed + i, parsed=parsed, parse_rate=parsed / num_samples,
                            top_parsed=top_parsed, top_parse_rate=top_parsed / top, ended=ended, samples=samples))
        print(f"[{i + 1}/{len(signatures)}] {rel}: {rate(parsed, num_samples)} parse, "
              f"top {top}: {rate(top_parsed, top)}, function ended in {rate(ended, num_samples)}")

    n = len(results)
    total = dict(parsed=sum(r["parsed"] for r in results), samples=n * num_samples,
                 top_parsed=sum(r["top_parsed"] for r in results), top_samples=n * top,
                 ended=sum(r["ended"] for r in results))
    total.update(parse_rate=total["parsed"] / total["samples"], top_parse_rate=total["top_parsed"] / total["top_samples"])
    # "ended": the function ended within max_new_tokens; a body cut off mid-function often does not
    # parse even when it is correct so far (an open docstring, bracket or block), so read the parse
    # rates next to it
    print(f"\n| file | function | parses (all {num_samples}) | parses (top {top} by mean logprob) | ended |")
    print("|---|---|---|---|---|")
    for r in results:
        name = r["signature"].split("(", 1)[0].removeprefix("def ").strip()
        print(f"| {r['file']} | `{name}` | {rate(r['parsed'], num_samples)} | {rate(r['top_parsed'], top)} | "
              f"{rate(r['ended'], num_samples)} |")
    print(f"| **all** | {n} functions | {rate(total['parsed'], total['samples'])} | "
          f"{rate(total['top_parsed'], total['top_samples'])} | {rate(total['ended'], total['samples'])} |")
    if output is not None:
        settings = dict(checkpoint_path=checkpoint_path, num_signatures=num_signatures, num_samples=num_samples,
                        temperature=temperature, max_new_tokens=max_new_tokens, top=top, seed=seed, device=str(dev),
                        python=platform.python_version(), stdlib=stdlib, split_python=split.get("python"),
                        held_out_files=len(held_out), skipped_missing=len(held_out) - len(present))
        # one JSON object on one line is a valid .json file; write_jsonl writes it atomically
        generate.write_jsonl(output, [dict(settings=settings, total=total, signatures=results)])
        print(f"wrote {output}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Share of sampled completions of held-out function signatures "
                                            "that are valid Python.")
    p.add_argument("--checkpoint_path", required=True, help="converted checkpoint directory with split.json beside it")
    p.add_argument("--num_signatures", type=int, default=5)
    p.add_argument("--num_samples", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--top", type=int, default=4, help="also score the TOP samples with the highest mean logprob")
    p.add_argument("--seed", type=int, default=0, help="signature i is sampled with seed + i")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--output", help="write all numbers and settings to this .json file")
    args = p.parse_args()
    try:
        main(**vars(args))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
