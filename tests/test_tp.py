# Tensor parallelism on CPU with gloo: k processes (torchrun) give the logits and the samples of
# one process, for MHA, GQA and MQA (whose one KV head each rank then holds a copy of), with
# bifurcated and standard attention; the CLI under torchrun; clear errors for bad world sizes.
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tp
from model import ModelArgs, Transformer
from test_cli import save_checkpoint
from tp_worker import run_all

ROOT = Path(__file__).resolve().parent.parent


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def one_and_two_processes(checkpoint: Path, tmp_path: Path) -> tuple[list[dict], list[dict], str]:
    """The JSONL records of one process and of two under torchrun, same sampling; and the latter's stdout."""
    args = ["--checkpoint_path", str(checkpoint), "--prompt_len", "12", "--num_samples", "3", "--max_new_tokens", "6",
            "--device", "cpu", "--temperature", "1.0", "--seed", "4"]
    one = subprocess.run([sys.executable, "generate.py", *args, "--output", str(tmp_path / "one.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "generate.py", *args, "--output", str(tmp_path / "two.jsonl"))
    assert two.returncode == 0, two.stderr[-3000:]
    read = lambda f: [json.loads(line) for line in (tmp_path / f).read_text().splitlines()]
    return read("one.jsonl"), read("two.jsonl"), two.stdout


@pytest.fixture(scope="module")
def reference():
    return run_all()


@pytest.mark.parametrize("world", [2, 4])
def test_tp_equals_one_process(world, reference, tmp_path):
    out = tmp_path / "tp.pt"
    proc = torchrun(world, "tests/tp_worker.py", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(out)
    assert results.keys() == reference.keys()
    for key, ref in reference.items():
        if key[-1] == "logits":
            torch.testing.assert_close(results[key], ref, atol=1e-5, rtol=0, msg=str(key))
        else:
            assert results[key] == ref, key


def test_cli_under_torchrun(tmp_path):
    # a real checkpoint: loaded on the CPU, sharded, and each shard moved to its rank's device
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny-gqa"))
    ckpt = save_checkpoint(tmp_path / "ckpt", {k: v.contiguous() for k, v in model.state_dict().items()}, model.config)
    one, two, stdout = one_and_two_processes(ckpt, tmp_path)
    assert stdout.count("--- stats ---") == 1, "rank 0 alone prints"
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    # synthetic weights are drawn per shard (no rank builds the whole model): it runs, rank 0 reports
    syn = torchrun(2, "generate.py", "--checkpoint_path", "synthetic:tiny-mqa", "--prompt_len", "8",
                   "--max_new_tokens", "4", "--device", "cpu")
    assert syn.returncode == 0 and "x 2 ranks" in syn.stdout, syn.stderr[-3000:]


def test_bad_world_size():
    proc = torchrun(3, "generate.py", "--checkpoint_path", "synthetic:tiny-mha", "--prompt_len", "8", "--device", "cpu")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: the world size 3 must divide the 4 query heads"]


def test_world_size_checks():
    tp.check_world_size(32, 8, 11008, 8)  # GQA: one KV head per rank
    tp.check_world_size(32, 1, 11008, 4)  # MQA: the KV head replicated
    with pytest.raises(ValueError, match="KV heads"):
        tp.check_world_size(48, 6, 11008, 4)
    with pytest.raises(ValueError, match="MLP width"):
        tp.check_world_size(32, 8, 11006, 4)
    assert [tp.kv_heads_of(r, 4, 2) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [tp.kv_heads_of(r, 2, 8) for r in range(2)] == [range(0, 4), range(4, 8)]


@pytest.mark.parametrize("mode", [["int8"], ["int4", "--groupsize", "32"]], ids=["int8", "int4"])
def test_quantized_checkpoint_under_torchrun(mode, tmp_path):
    # quantized layers shard in their own layouts (int4: whole groups per rank)
    torch.manual_seed(0)
    cfg = ModelArgs(dim=256, intermediate_size=512, n_layer=2, n_head=4, n_kv_heads=2, vocab_size=512, block_size=256)
    model = Transformer(cfg)
    ckpt = save_checkpoint(tmp_path / "ckpt", {k: v.contiguous() for k, v in model.state_dict().items()}, cfg)
    q = subprocess.run([sys.executable, "quantize.py", "--checkpoint_path", str(ckpt), "--mode", *mode],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert q.returncode == 0, q.stderr
    a, b, _ = one_and_two_processes(next(p for p in ckpt.iterdir() if p.name.startswith("converted.int")), tmp_path)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert [r["mean_logprob"] for r in a] == pytest.approx([r["mean_logprob"] for r in b], abs=1e-5)
