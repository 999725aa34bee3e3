# The acceptance test: tiny random Hugging Face Llama models, converted by the production
# converter and loaded by checkpoint.load_model, give the same logits and the same greedy
# continuations as transformers' LlamaForCausalLM.
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from bifurcated import CACHES
from checkpoint import CHECKPOINT_FILE, load_model
from generate import generate
from scripts.convert_hf_checkpoint import convert

REPO = Path(__file__).resolve().parent.parent
BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=176, vocab_size=512,
            max_position_embeddings=256,
            # wider than HF's default 0.02: with those weights a tiny model's greedy output is one
            # token repeated, which would not tell a right continuation from a wrong one
            initializer_range=0.3)
LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)
CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "llama31": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
}


def make_hf_model(name: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**BASE, **CONFIGS[name])).eval()
    model.generation_config.eos_token_id = None  # never stop early: compare all max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def save_hf(model: LlamaForCausalLM, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request, tmp_path_factory):
    hf = make_hf_model(request.param)
    tmp = tmp_path_factory.mktemp(request.param)
    out = convert(save_hf(hf, tmp / "hf"), tmp / "converted")
    return request.param, hf, out


@torch.no_grad()
def test_logits_match_hf(converted):
    name, hf, out = converted
    model, tokenizer = load_model(str(out), device="cpu", dtype=torch.float32)
    assert tokenizer is None
    # beyond original_max_position_embeddings (64), so Llama-3.1's rope scaling matters
    S = 100 if name == "llama31" else 40
    idx = torch.randint(0, BASE["vocab_size"], (1, S), generator=torch.Generator().manual_seed(1))  # (1, S)
    model.setup(S)
    ours = model(idx, torch.arange(S))  # (1, S, V)
    theirs = hf(idx).logits  # (1, S, V)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    if name == "llama31":  # the match above must not hold by accident with scaling left out
        model.config.rope_scaling = None
        model.setup(S)
        assert (model(idx, torch.arange(S)) - theirs).abs().max() > 1e-2


@torch.no_grad()
def test_greedy_matches_hf(converted):
    name, hf, out = converted
    model, _ = load_model(str(out), device="cpu", dtype=torch.float32)
    prompt = torch.randint(0, BASE["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(2))  # (1, 12)
    expected = hf.generate(prompt, max_new_tokens=32, do_sample=False)[0, 12:].tolist()
    assert len(expected) == 32 and len(set(expected)) > 8  # a real sequence, not one token repeated
    for attention in CACHES:
        got = generate(model, prompt[0].tolist(), num_samples=2, max_new_tokens=32, temperature=0.0,
                       eos_ids=(), attention=attention)
        assert got.tokens == [expected, expected], attention


def assert_same_tensors(a: Path, b: Path):
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_cli_gives_same_file(tmp_path):
    hf_dir = save_hf(make_hf_model("gqa"), tmp_path / "hf")
    proc = subprocess.run([sys.executable, "scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(hf_dir),
                           "--output_dir", str(tmp_path / "cli")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "converted 2 layers" in proc.stdout and "tokenizer: none found" in proc.stdout
    assert_same_tensors(tmp_path / "cli" / CHECKPOINT_FILE, convert(hf_dir, tmp_path / "api"))


def test_pytorch_bin_gives_same_tensors(tmp_path):
    # tied: older transformers also stored the tied lm_head in .bin files, which must be accepted
    hf = make_hf_model("tied")
    bin_dir = tmp_path / "hf_bin"
    bin_dir.mkdir()
    hf.config.save_pretrained(bin_dir)
    state = hf.state_dict()
    assert "lm_head.weight" in state
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old files keep this buffer
    torch.save(state, bin_dir / "pytorch_model.bin")
    from_bin = convert(bin_dir, tmp_path / "from_bin")
    assert_same_tensors(from_bin, convert(save_hf(hf, tmp_path / "hf"), tmp_path / "from_safetensors"))
