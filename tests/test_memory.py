# The memory planner: predicted bytes against the model's real parameter count, and the
# "does not fit" message with the largest number of samples that fits.
import re

import pytest
import torch

from bifurcated import check_memory, free_memory, plan_memory
from model import ModelArgs, Transformer


@pytest.mark.parametrize("name", ["Llama-2-7B", "Mistral-7B", "tiny-mqa"])
def test_weights_and_caches(name):
    cfg = ModelArgs.from_name(name)
    with torch.device("meta"):
        params = sum(p.numel() for p in Transformer(cfg).parameters())
    bif = plan_memory(cfg, "bifurcated", 32, 8192, 128, torch.bfloat16)
    std = plan_memory(cfg, "standard", 32, 8192, 128, torch.bfloat16)
    assert bif["weights"] == std["weights"] == 2 * params
    kv_token = 2 * cfg.n_layer * cfg.n_kv_heads * cfg.head_dim * 2
    assert bif["context"] == kv_token * 8192 and std["context"] == 32 * bif["context"]
    assert bif["decode"] == std["decode"] == kv_token * 32 * 128
    assert bif["total"] == sum(v for k, v in bif.items() if k != "total")


def fake_gpu(monkeypatch, free_bytes: int):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 80 * 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)


def test_free_memory(monkeypatch):
    fake_gpu(monkeypatch, 60 * 10**9)
    assert free_memory("cuda") == 60 * 10**9 and free_memory(torch.device("cpu")) is None


def test_does_not_fit_names_the_largest_n():
    cfg, free = ModelArgs.from_name("Llama-2-7B"), 60 * 10**9  # beside the weights, as on an 80 GB GPU
    check_memory(cfg, "bifurcated", 32, 8192, 128, torch.bfloat16, free)  # fits: no error
    with pytest.raises(ValueError, match="does not fit") as e:
        check_memory(cfg, "standard", 32, 8192, 128, torch.bfloat16, free)
    msg = str(e.value)
    assert "\n" not in msg and "context cache 137.4" in msg
    fit = int(re.search(r"at most (\d+) samples fit", msg).group(1))
    need = lambda n: (lambda p: p["total"] - p["weights"])(plan_memory(cfg, "standard", n, 8192, 128, torch.bfloat16))
    assert need(fit) <= free < need(fit + 1)


def test_not_even_one_sample():
    with pytest.raises(ValueError, match="not even one sample fits"):
        check_memory(ModelArgs.from_name("Llama-2-7B"), "bifurcated", 1, 32768, 128, torch.bfloat16, 10**9)
