# Many prompts at once after a shared prefix (three cache levels), fp32 on CPU: each prompt's samples
# equal those of running prefix + prompt alone with the same seed; the attention of the three
# levels equals one softmax over the concatenated keys.
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as generate_module
from bifurcated import DoesNotFit, PrefixCache, plan_memory, prefix_attention, prompt_groups
from compiled import DecodeLoop
from generate import DEFAULT_CHECKPOINT, complete_many, generate, generate_many, load_model
from model import ModelArgs
from test_cli import assert_one_line_error
from test_generate import CONFIGS, prompt_ids, tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("prefix_len", [0, 1, 23])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_each_prompt_as_if_alone(name, prefix_len, temperature):
    model = tiny_model(name)
    prefix = prompt_ids(prefix_len, seed=5)
    prompts = [prompt_ids(m, seed=10 + m) for m in (7, 1, 30)]  # unequal lengths
    kwargs = dict(num_samples=4, max_new_tokens=12, temperature=temperature, seed=3)
    many = generate_many(model, prompts, prefix, **kwargs)
    assert len(many) == 3
    for p, prompt in enumerate(prompts):
        alone = generate(model, prefix + prompt, **kwargs)
        assert many[p].tokens == alone.tokens, f"prompt {p}"
        assert many[p].mean_logprob == pytest.approx(alone.mean_logprob, abs=1e-4)
        assert many[p].stats["prompt_tokens"] == prefix_len + len(prompt)
    assert many[0].stats["num_prompts"] == 3 and many[0].stats["prefix_tokens"] == prefix_len


@pytest.mark.parametrize("name", CONFIGS)
def test_prompts_prefilled_in_one_pass(name):
    # after the prefix, the prompts in one sequence (PrefixCache.prompts): each prompt's last logits as those
    # of prefix + prompt through the model alone, without a cache
    model, (Mp, lens) = tiny_model(name), (11, [5, 1, 17])
    cfg, prefix, prompts = model.config, prompt_ids(Mp, seed=1), [prompt_ids(L, seed=L) for L in lens]
    caches = [PrefixCache(2, cfg.n_kv_heads, cfg.head_dim, Mp, lens, 4, torch.float32) for _ in model.layers]
    model.setup(Mp + max(lens) + 4, caches)
    model.hidden(torch.tensor([prefix]), torch.arange(Mp))
    for c in caches:
        c.prompts = True
    with pytest.raises(ValueError, match="23 tokens in one row"):
        model.hidden(torch.tensor([sum(prompts, [])[1:]]), torch.full((22,), Mp))
    x = model.hidden(torch.tensor([sum(prompts, [])]), torch.tensor([Mp + i for L in lens for i in range(L)]))[0]
    logits = model.output(model.norm(x[torch.tensor(lens).cumsum(0) - 1]))  # (P, V)
    model.setup(Mp + max(lens))  # no cache: each prefix + prompt from scratch
    for p, prompt in enumerate(prompts):
        alone = model(torch.tensor([prefix + prompt]), torch.arange(Mp + lens[p]))[0, -1]
        torch.testing.assert_close(logits[p], alone, rtol=1e-4, atol=1e-4)


def test_eos_and_one_prompt_in_a_list():
    model = tiny_model("tiny-gqa")
    prompts = [prompt_ids(9, seed=1), prompt_ids(4, seed=2)]
    kwargs = dict(num_samples=3, max_new_tokens=40, temperature=1.0, seed=0)
    many = generate_many(model, prompts, prompt_ids(5, seed=3), **kwargs)
    eos = many[1].tokens[0][2]  # a token that sample 0 of prompt 1 draws: it must stop there
    stopped = generate_many(model, prompts, prompt_ids(5, seed=3), eos_ids=[eos], **kwargs)
    assert stopped[1].finish_reason[0] == "eos" and stopped[1].tokens[0] == many[1].tokens[0][:2]
    one = generate_many(model, prompts[:1], prompt_ids(5, seed=3), **kwargs)  # one prompt: one context
    assert one[0].tokens == many[0].tokens


@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_prefix_attention_against_one_softmax(Hkv):
    g = torch.Generator().manual_seed(Hkv)
    H, D, Np, n, Mp, L, T, slot = 4, 16, 3, 2, 11, 9, 6, 3
    lens = torch.tensor([9, 2, 5])
    r = lambda *s: torch.randn(*s, generator=g)
    q, k_pre, v_pre = r(Np * n, H, 1, D), r(Hkv, Mp, D), r(Hkv, Mp, D)
    k_prm, v_prm, k_dec, v_dec = r(Np, Hkv, L, D), r(Np, Hkv, L, D), r(Np * n, Hkv, T, D), r(Np * n, Hkv, T, D)
    out = prefix_attention(q, k_pre, v_pre, k_prm, v_prm, lens, k_dec, v_dec, torch.tensor([slot]))
    for row in range(Np * n):
        p = row // n
        k = torch.cat([k_pre, k_prm[p, :, : lens[p]], k_dec[row, :, : slot + 1]], dim=1)  # (Hkv, keys, D)
        v = torch.cat([v_pre, v_prm[p, :, : lens[p]], v_dec[row, :, : slot + 1]], dim=1)
        k, v = k.repeat_interleave(H // Hkv, 0), v.repeat_interleave(H // Hkv, 0)  # (H, keys, D)
        k, v = k.double(), v.double()  # an fp64 reference for the fp32 path
        ref = torch.softmax(q[row].double() @ k.transpose(1, 2) / D**0.5, dim=-1) @ v  # (H, 1, D)
        torch.testing.assert_close(out[row].double(), ref, rtol=1e-5, atol=1e-5)


def test_bad_prompt_lists():
    model = tiny_model("tiny-mha")
    with pytest.raises(ValueError, match="no prompts"):
        generate_many(model, [], [1, 2])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_many(model, [[1, 2], []], [3])
    with pytest.raises(ValueError, match="bifurcated attention only"):
        generate_many(model, [[1, 2], [3]], attention="standard")


# ---------------------------------------------------------------------------------------------
# The command line, on the shipped model
PROMPTS, PREFIX = ["def add(a, b):", "def sub(a, b):"], "# math helpers\n"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("kind", ["lines", "jsonl"])
def test_cli_prompt_file_and_shared_prefix(tmp_path, kind):
    if kind == "lines":
        prompts = tmp_path / "prompts.txt"
        prompts.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")  # blank lines are skipped
    else:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "out.jsonl"
    proc = run_cli(f"--prompt_file={prompts}", f"--shared_prefix={PREFIX}", "--num_samples=3", "--max_new_tokens=8",
                   "--seed=0", "--rerank", f"--output={out}")
    assert proc.returncode == 0, proc.stderr
    assert "2 prompts after a shared prefix" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["rank"]) for r in records] == [(p, k) for p in (0, 1) for k in (1, 2, 3)]
    model, tokenizer = load_model(str(DEFAULT_CHECKPOINT))
    for p, text in enumerate(PROMPTS):
        mine = [r for r in records if r["prompt_index"] == p]
        assert [r["mean_logprob"] for r in mine] == sorted((r["mean_logprob"] for r in mine), reverse=True)
        alone, _ = complete_many(model, tokenizer, [text], PREFIX, num_samples=3, max_new_tokens=8, seed=0)
        assert sorted(r["tokens"] for r in alone) == sorted(r["tokens"] for r in mine)


@pytest.mark.parametrize("name,content,args,expected", [
    ("empty.txt", "\n\n", [], "holds no prompt"),
    ("bad.jsonl", '{"text": "x"}\n', [], '"prompt"'),
    ("bad2.jsonl", '{"prompt": ""}\n', [], "non-empty"),
    ("p.txt", "x\n", ["--shared_prefix=a", "--shared_prefix_file=nowhere"], "at most one"),
    ("p.txt", "x\n", ["--shared_prefix_file=/nowhere/prefix.txt"], "cannot read shared prefix file"),
])
def test_cli_bad_prompt_files(tmp_path, name, content, args, expected):
    (tmp_path / name).write_text(content)
    assert_one_line_error(run_cli(f"--prompt_file={tmp_path / name}", *args), expected)


def test_prompt_groups_fit_and_are_as_large_as_fit():
    cfg, n, Mp, T, dtype = ModelArgs.from_name("Llama-2-7B"), 32, 4096, 128, torch.bfloat16
    lens = [512, 300, 700, 512, 100, 900, 50, 64]

    def need(group: list[int]) -> int:  # beside the weights, each prompt's level padded to the longest
        plan = plan_memory(cfg, "bifurcated", len(group) * n, Mp + len(group) * max(group), T, dtype)
        return plan["total"] - plan["weights"]

    assert prompt_groups(cfg, n, Mp, lens, T, dtype, need(lens)) == [range(len(lens))]
    free = need(lens[:3])
    groups = prompt_groups(cfg, n, Mp, lens, T, dtype, free)
    assert [p for g in groups for p in g] == list(range(len(lens))) and len(groups) > 2
    for g, after in zip(groups, groups[1:] + [None]):
        assert need([lens[p] for p in g]) <= free
        if after is not None:  # one prompt more would not fit
            assert need([lens[p] for p in g] + [lens[after[0]]]) > free


def test_prompts_in_groups_that_fit_as_all_at_once(monkeypatch):
    # more prompts than fit at once: consecutive groups that fit, one run each; every prompt's samples
    # (tokens, texts, stops, log-probs) as in one run of them all, the stats over all the runs. Each
    # prompt's level holds the longest prompt of all, so the groups of as many prompts run in the same
    # caches and decode loop (its compiled step and CUDA graph): one loop for them, one for the last
    model, tok = load_model(str(DEFAULT_CHECKPOINT), "cpu", torch.float32)
    prefix, prompts = "import os\n", ["def f(x):\n    ", "class A:", "def g():\n    return", "x = 1\n", "if x:\n"]
    kw = dict(num_samples=3, max_new_tokens=20, seed=4, stop=["\n\n"])
    together, stats = complete_many(model, tok, prompts, prefix, **kw)
    assert "groups" not in stats
    prefix_ids, lens = tok.encode(prefix), [len(tok.encode(p, bos=False)) for p in prompts]
    plan = plan_memory(model.config, "bifurcated", 2 * 3, len(prefix_ids) + 2 * max(lens), 20, torch.float32)
    monkeypatch.setattr(generate_module, "free_memory", lambda device: plan["total"] - plan["weights"])
    groups = prompt_groups(model.config, 3, len(prefix_ids), lens, 20, torch.float32, plan["total"] - plan["weights"],
                           max(lens))
    assert [len(g) for g in groups] == [2, 2, 1]
    model.last_run = None  # as in a fresh process: not the run of the same sizes above, which was let in
    with pytest.raises(DoesNotFit, match="does not fit") as e:
        generate_many(model, [tok.encode(p, bos=False) for p in prompts], prefix_ids, num_samples=3,
                      max_new_tokens=20)
    assert e.value.groups == groups
    loops = []
    monkeypatch.setattr(generate_module, "DecodeLoop", lambda *a: loops.append(DecodeLoop(*a)) or loops[-1])
    grouped, grouped_stats = complete_many(model, tok, prompts, prefix, **kw)
    assert len(loops) == 2
    assert grouped_stats["groups"] == len(groups) and grouped_stats["num_prompts"] == len(prompts)
    assert grouped_stats["prefix_tokens"] == len(prefix_ids) and grouped_stats["tokens_per_s"] > 0
    for a, b in zip(together, grouped, strict=True):
        assert a["mean_logprob"] == pytest.approx(b["mean_logprob"], abs=1e-5)
        assert {**a, "mean_logprob": 0} == {**b, "mean_logprob": 0}
