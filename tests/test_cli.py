# The command line end to end, as a user runs it: `python generate.py ...` in a subprocess on a
# real (tiny, random) checkpoint written here. Every mistake a user can make ends in one
# `error:` line on stderr, a non-zero exit, no traceback, and no touched or half-written output.
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tok_fixtures
from checkpoint import CHECKPOINT_FILE
from model import ModelArgs, Transformer
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
OLD_OUTPUT = '{"old": "output"}\n'


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def save_checkpoint(dirpath: Path, state: dict, config: ModelArgs) -> Path:
    dirpath.mkdir()
    save_file(state, dirpath / CHECKPOINT_FILE, metadata={"format": "pt", "config": config.to_json()})
    return dirpath


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    # One good checkpoint directory and the broken variants of it the error cases point at.
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny-gqa"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    good = save_checkpoint(root / "good", state, model.config)
    # the tokenizer covers the whole model vocabulary: random weights sample every id
    tok_fixtures.make_sentencepiece(good, vocab_size=model.config.vocab_size)

    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / CHECKPOINT_FILE).write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00not a safetensors file")

    bad_tok = save_checkpoint(root / "bad_tok", state, model.config)
    (bad_tok / "tokenizer.model").write_bytes(bytes(range(256)) * 4)

    no_tok = save_checkpoint(root / "no_tok", state, model.config)

    small_tok = save_checkpoint(root / "small_tok", state, model.config)
    tok_fixtures.make_sentencepiece(small_tok, vocab_size=400)

    # the tiny-gqa weights (Hkv=2) under the tiny-mha config (Hkv=4): wqkv has the wrong shape
    save_checkpoint(root / "wrong_config", state, ModelArgs.from_name("tiny-mha"))
    return dict(good=good, corrupt=corrupt, bad_tok=bad_tok, no_tok=no_tok, small_tok=small_tok,
                wrong_config=root / "wrong_config", missing=root / "nowhere")


def assert_one_line_error(proc: subprocess.CompletedProcess, *expected: str):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for text in expected:
        assert text in lines[0]


GOOD = "--checkpoint_path={good}"
BAD_INPUTS = {
    # case: (arguments, substrings of the error line)
    "missing_checkpoint": (["--checkpoint_path={missing}", "--prompt=x"], ["checkpoint not found"]),
    "corrupt_checkpoint": (["--checkpoint_path={corrupt}", "--prompt=x"], ["cannot read checkpoint"]),
    "corrupt_tokenizer": (["--checkpoint_path={bad_tok}", "--prompt=x"], ["cannot read tokenizer"]),
    "missing_tokenizer": (["--checkpoint_path={no_tok}", "--prompt=x"], ["no tokenizer"]),
    "unknown_config": (["--checkpoint_path=synthetic:NoSuchModel", "--prompt_len=4"],
                       ["'NoSuchModel'", "tiny-gqa", "Llama-2-7B"]),
    "shapes_not_config": (["--checkpoint_path={wrong_config}", "--prompt=x"],
                          ["does not match its config", "wqkv"]),
    "too_long": ([GOOD, "--prompt_len=500", "--max_new_tokens=20"], ["520", "maximum length of 512"]),
    "num_samples_0": ([GOOD, "--prompt=x", "--num_samples=0"], ["num_samples"]),
    "max_new_tokens_0": ([GOOD, "--prompt=x", "--max_new_tokens=0"], ["max_new_tokens"]),
    "temperature_neg": ([GOOD, "--prompt=x", "--temperature=-1"], ["temperature"]),
    "top_k_0": ([GOOD, "--prompt=x", "--top_k=0"], ["top_k"]),
    "top_p_0": ([GOOD, "--prompt=x", "--top_p=0"], ["top_p"]),
    "top_p_1.5": ([GOOD, "--prompt=x", "--top_p=1.5"], ["top_p"]),
    "empty_prompt": ([GOOD, "--prompt="], ["prompt is empty"]),
    # an index past every GPU there is: cuda:7 on a CPU machine
    "absent_gpu": ([GOOD, "--prompt=x", f"--device=cuda:{max(7, torch.cuda.device_count())}"], ["not available"]),
    "nonsense_device": ([GOOD, "--prompt=x", "--device=foo"], ["'foo'"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_error_and_output_untouched(case, ckpts, tmp_path):
    args, expected = BAD_INPUTS[case]
    out = tmp_path / "out.jsonl"
    out.write_text(OLD_OUTPUT)
    args = [a.format(**ckpts) for a in args]
    for default in ("--device=cpu", "--max_new_tokens=2"):  # cheap runs unless the case says otherwise
        if not any(a.startswith(default.split("=")[0]) for a in args):
            args.append(default)
    proc = run_cli(*args, f"--output={out}")
    assert_one_line_error(proc, *expected)
    assert out.read_text() == OLD_OUTPUT  # the previous results survive a failed run
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # and no temporary file is left


def test_output_into_missing_directory(ckpts, tmp_path):
    out = tmp_path / "no_such_dir" / "out.jsonl"
    proc = run_cli(f"--checkpoint_path={ckpts['good']}", "--prompt=x", "--max_new_tokens=2", "--device=cpu",
                   f"--output={out}")
    assert_one_line_error(proc, "output directory does not exist")
    assert not out.parent.exists()


SAMPLE_ARGS = ["--prompt=def f(x):", "--num_samples=4", "--max_new_tokens=8", "--temperature=1.0", "--seed=1",
               "--device=cpu"]


def sample_to(tmp_path: Path, checkpoint: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "out.jsonl"
    out.write_text(OLD_OUTPUT)  # replaced, not appended to
    proc = run_cli(f"--checkpoint_path={checkpoint}", *SAMPLE_ARGS, f"--output={out}", *extra)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left
    return proc, [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def bifurcated_run(ckpts, tmp_path_factory):
    return sample_to(tmp_path_factory.mktemp("bifurcated"), ckpts["good"])


def test_sample_checkpoint_dir(bifurcated_run, ckpts):
    proc, records = bifurcated_run
    for i in range(4):
        assert f"--- sample {i} (" in proc.stdout
    for stat in ("prefill", "ms/step", "tokens/s", "peak memory"):
        assert stat in proc.stdout
    tok = load_tokenizer(ckpts["good"])
    prompt_ids = tok.encode("def f(x):", bos=True)
    prompt_tokens = len(prompt_ids)
    assert [r["sample"] for r in records] == [0, 1, 2, 3]
    for r in records:
        assert set(r) == {"prompt_index", "sample", "prompt_tokens", "tokens", "text", "mean_logprob", "finish_reason"}
        assert r["prompt_tokens"] == prompt_tokens
        assert all(isinstance(t, int) and 0 <= t < 512 for t in r["tokens"])
        assert tok.decode(prompt_ids) + r["text"] == tok.decode(prompt_ids + r["tokens"])  # the continuation
        assert r["finish_reason"] in ("eos", "length")
        assert (len(r["tokens"]) == 8) if r["finish_reason"] == "length" else (len(r["tokens"]) < 8)
        assert r["mean_logprob"] <= 0


def test_checkpoint_file_path_same_as_dir(bifurcated_run, ckpts, tmp_path):
    _, records = sample_to(tmp_path, ckpts["good"] / CHECKPOINT_FILE)
    assert records == bifurcated_run[1]


def test_standard_attention_same_tokens(bifurcated_run, ckpts, tmp_path):
    _, records = sample_to(tmp_path, ckpts["good"], "--attention=standard")
    assert [r["tokens"] for r in records] == [r["tokens"] for r in bifurcated_run[1]]
    assert [r["mean_logprob"] for r in records] == pytest.approx([r["mean_logprob"] for r in bifurcated_run[1]],
                                                                 abs=1e-4)


def test_synthetic_checkpoint():
    proc = run_cli("--checkpoint_path=synthetic:tiny-mha", "--prompt_len=16", "--num_samples=3",
                   "--max_new_tokens=5", "--device=cpu")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "3 samples x 5 steps" in proc.stdout


def test_tokenizer_smaller_than_model_vocab(ckpts, tmp_path):
    # Real checkpoints often pad the embedding past the tokenizer; sampling must stay below it.
    # With random weights, 4 x 8 draws would all land below 400 of 512 ids with probability 0.0004.
    _, records = sample_to(tmp_path, ckpts["small_tok"])
    assert len(records) == 4 and all(isinstance(r["text"], str) for r in records)
    assert all(t < 400 for r in records for t in r["tokens"])
