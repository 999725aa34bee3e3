# The shipped default model (models/tiny-code, trained by scripts/train_tiny.py): the default
# command works out of the box, a golden greedy output, re-ranking, and the training script.
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from checkpoint import CHECKPOINT_FILE, DEFAULT_CHECKPOINT, TOKENIZER_FILE, load_model
from generate import complete
from model import ModelArgs

ROOT = Path(__file__).resolve().parent.parent

# Greedy, fp32 on CPU, 48 new tokens: any change to numerics, loading or tokenization shows here.
GOLDEN_PROMPT = "def fibonacci(n):"
GOLDEN_TEXT = ("\n        if normpl.startswith(b'\\x99') and normplural[n:] == n:\n"
               "            n = normpl.encode(n)\n            n = n +")


def run(*args: str, script: str = "generate.py") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_shipped_model_is_small_and_complete():
    files = [DEFAULT_CHECKPOINT / CHECKPOINT_FILE, DEFAULT_CHECKPOINT / TOKENIZER_FILE]
    assert sum(f.stat().st_size for f in files) <= 25 * 2**20
    log = json.loads((DEFAULT_CHECKPOINT / "train_log.json").read_text())
    assert log["final_held_out_loss"] < 2.5


def test_golden_greedy():
    model, tokenizer = load_model(str(DEFAULT_CHECKPOINT), "cpu", torch.float32)
    records, _ = complete(model, tokenizer, GOLDEN_PROMPT, num_samples=2, max_new_tokens=48, temperature=0.0)
    assert records[0]["text"] == GOLDEN_TEXT
    assert records[1]["tokens"] == records[0]["tokens"]


def test_default_command_out_of_the_box(tmp_path):
    out = tmp_path / "samples.jsonl"
    proc = run("--num_samples", "32", "--prompt", GOLDEN_PROMPT, "--rerank", "--seed", "0", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    if not torch.cuda.is_available():
        assert " on cpu " in proc.stdout
    assert "--- stats ---" in proc.stdout and "ms/step" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 32 and len({r["text"] for r in records}) == 32
    assert [r["rank"] for r in records] == list(range(1, 33))
    means = [r["mean_logprob"] for r in records]
    assert means == sorted(means, reverse=True)
    assert proc.stdout.count("--- rank ") == 32


def test_train_tiny_runs_and_is_reproducible(tmp_path):
    args = ["--max_files", "30", "--steps", "4", "--eval_every", "2", "--dim", "32", "--n_layer", "2",
            "--n_head", "4", "--n_kv_heads", "2", "--seq_len", "64", "--batch_size", "4", "--vocab_size", "400",
            "--device", "cpu"]
    for name in ("a", "b"):
        proc = run("--out_dir", str(tmp_path / name), *args, script="scripts/train_tiny.py")
        assert proc.returncode == 0, proc.stderr
        assert "held-out loss" in proc.stdout
    a, b = load_file(tmp_path / "a" / CHECKPOINT_FILE), load_file(tmp_path / "b" / CHECKPOINT_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    split = json.loads((tmp_path / "a" / "split.json").read_text())
    assert split["held_out"] and split["train"] and not set(split["held_out"]) & set(split["train"])
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert [e["step"] for e in log["log"]] == [2, 4]
    assert log["log"][-1]["held_out_loss"] < log["log"][0]["held_out_loss"] + 0.5
    model, tokenizer = load_model(str(tmp_path / "a"), "cpu", torch.float32)
    assert model.config == ModelArgs(block_size=64, vocab_size=400, n_layer=2, n_head=4, n_kv_heads=2, dim=32)
    records, _ = complete(model, tokenizer, "def f(x):", num_samples=2, max_new_tokens=8, temperature=1.0, seed=0)
    assert all(len(r["tokens"]) == 8 or r["finish_reason"] == "eos" for r in records)
