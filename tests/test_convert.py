# The converter's edges: user errors give one clear line, the tokenizer and the config travel
# with the checkpoint, sharded / in-place / dtype conversions, and download.py fails cleanly offline.
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoint import CHECKPOINT_FILE
from model import ModelArgs
from scripts.convert_hf_checkpoint import convert
from test_hf_parity import make_hf_model, save_hf

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    # read-only for the tests: each converts into its own output directory
    return save_hf(make_hf_model("gqa"), tmp_path_factory.mktemp("hf") / "gqa")


def copy_hf(src: Path, dst: Path, drop: str = "", add: dict = None) -> Path:
    """A copy of a single-file HF checkpoint with one tensor dropped or some added."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = {k: v for k, v in load_file(src / "model.safetensors").items() if k != drop}
    save_file({**state, **(add or {})}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def run_script(*args: str, env: dict = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str):
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "nope")


def test_no_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert(tmp_path)


def test_no_weights(tmp_path, hf_dir):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no Hugging Face weights"):
        convert(tmp_path)


def test_non_llama_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(ValueError, match="'gpt2' is not a Llama-family model"):
        convert(tmp_path)


def test_missing_tensor(tmp_path, hf_dir):
    src = copy_hf(hf_dir, tmp_path / "hf", drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_unexpected_tensor(tmp_path, hf_dir):
    src = copy_hf(hf_dir, tmp_path / "hf", add={"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias"):
        convert(src, tmp_path / "out")


def test_shape_mismatch(tmp_path, hf_dir):
    src = copy_hf(hf_dir, tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape .*176.* implies .*128"):
        convert(src, tmp_path / "out")


def test_cli_errors(tmp_path, hf_dir):
    script = "scripts/convert_hf_checkpoint.py"
    assert_one_line_error(run_script(script, "--checkpoint_dir", str(tmp_path / "nope")), "does not exist")
    src = copy_hf(hf_dir, tmp_path / "hf", drop="model.norm.weight")
    assert_one_line_error(run_script(script, "--checkpoint_dir", str(src), "--output_dir", str(tmp_path / "out")),
                          "missing tensor model.norm.weight")
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00not a safetensors file")
    assert_one_line_error(run_script(script, "--checkpoint_dir", str(bad)), "error")


def test_tokenizer_copied(tmp_path, hf_dir):
    src = copy_hf(hf_dir, tmp_path / "hf")
    blob = bytes(range(256)) * 5  # any bytes: the converter copies, it does not parse
    (src / "tokenizer.model").write_bytes(blob)
    out = convert(src, tmp_path / "out")
    assert (out.parent / "tokenizer.model").read_bytes() == blob


def test_llama3_tokenizer_in_original(tmp_path, hf_dir):
    src = copy_hf(hf_dir, tmp_path / "hf")
    (src / "original").mkdir()
    (src / "original" / "tokenizer.model").write_bytes(b"tiktoken ranks")
    out = convert(src, tmp_path / "out")
    assert (out.parent / "tokenizer.model").read_bytes() == b"tiktoken ranks"


def test_no_tokenizer_is_reported(tmp_path, hf_dir, capsys):
    out = convert(hf_dir, tmp_path / "out")
    assert "tokenizer: none found" in capsys.readouterr().out
    assert not (out.parent / "tokenizer.model").exists()


def test_metadata_config_round_trips(tmp_path, hf_dir):
    out = convert(hf_dir, tmp_path / "out")
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    args = ModelArgs.from_json(meta["config"])
    assert args == ModelArgs.from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    assert (args.n_layer, args.n_head, args.n_kv_heads, args.dim, args.vocab_size) == (2, 4, 2, 64, 512)
    assert sorted(os.listdir(out.parent)) == [CHECKPOINT_FILE]  # no temp file left behind


def test_sharded_and_in_place(tmp_path, hf_dir):
    single = load_file(convert(hf_dir, tmp_path / "single"))
    sharded = save_hf(make_hf_model("gqa"), tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    # in place, twice: the second run must read the shards again, not the first run's output
    for _ in range(2):
        out = convert(sharded)
        assert out == sharded / CHECKPOINT_FILE
        converted = load_file(out)
        assert converted.keys() == single.keys()
        assert all(torch.equal(converted[k], single[k]) for k in single)
    os.remove(sharded / "model.safetensors.index.json")  # found by glob alone, skipping the converted file
    assert all(torch.equal(load_file(convert(sharded))[k], single[k]) for k in single)


def test_dtype(tmp_path, hf_dir):
    kept = load_file(convert(hf_dir, tmp_path / "kept"))
    assert {t.dtype for t in kept.values()} == {torch.float32}
    cast = load_file(convert(hf_dir, tmp_path / "bf16", dtype="bfloat16"))
    assert {t.dtype for t in cast.values()} == {torch.bfloat16}
    assert torch.equal(cast["norm.weight"], kept["norm.weight"].bfloat16())
    with pytest.raises(ValueError, match="unknown dtype"):
        convert(hf_dir, tmp_path / "bad", dtype="int8")


def test_download_offline_fails_cleanly(tmp_path):
    # offline and an empty cache: no network is touched, and the failure is one line
    proc = run_script("scripts/download.py", "--repo_id", "no-such-org/no-such-model", "--out_dir",
                      str(tmp_path / "dl"), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")})
    assert_one_line_error(proc, "could not download no-such-org/no-such-model")
    assert not (tmp_path / "dl" / CHECKPOINT_FILE).exists()


def test_single_file_in_place(tmp_path, hf_dir):
    # Hugging Face's single file is model.safetensors; the converted one sits beside it
    src = copy_hf(hf_dir, tmp_path / "hf")
    out = convert(src)
    assert out.parent == src and (src / "model.safetensors").exists()
    ref = load_file(convert(hf_dir, tmp_path / "ref"))
    assert all(torch.equal(load_file(out)[k], ref[k]) for k in ref)
