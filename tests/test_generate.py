# The engine's invariants on tiny models, fp32 on CPU: bifurcated == standard attention,
# cached decoding == recomputing the whole sequence without a cache, seeds, sampling, EOS.
import pytest
import torch

from bifurcated import bifurcated_attention, make_caches
from generate import generate, generate_many
from model import ModelArgs, Transformer
from sampling import argmax_rows, sample_tokens

CONFIGS = ["tiny-mha", "tiny-gqa", "tiny-mqa"]


def tiny_model(name: str, seed: int = 0) -> Transformer:
    # PyTorch's default init gives peaked next-token distributions, unlike normal(0, 0.02):
    # samples then depend on the logits, not only on the random draws.
    torch.manual_seed(seed)
    return Transformer(ModelArgs.from_name(name)).eval()


def prompt_ids(m: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 512, (m,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def step_logits(model: Transformer, attention: str, prompt: list[int], tokens: torch.Tensor) -> list[torch.Tensor]:
    """Prefill `prompt`, then feed tokens (n, T) one step at a time; the logits of every step."""
    cfg, (n, T), M = model.config, tokens.shape, len(prompt)
    dev, dtype = model.output.weight.device, model.output.weight.dtype
    model.setup(M + T, make_caches(attention, cfg, n, M, T, dtype, dev))
    out = [model(torch.tensor([prompt], device=dev), torch.arange(M, device=dev))[:, -1].expand(n, -1)]
    for t in range(T):
        out.append(model(tokens[:, t : t + 1], torch.tensor(M + t, device=dev))[:, -1])
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_bifurcated_equals_standard_and_no_cache(name):
    model = tiny_model(name)
    prompt, n, T = prompt_ids(37), 5, 12
    tokens = torch.randint(0, 512, (n, T), generator=torch.Generator().manual_seed(2))
    bif = step_logits(model, "bifurcated", prompt, tokens)
    std = step_logits(model, "standard", prompt, tokens)
    for a, b in zip(bif, std):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # no cache: every sample's whole sequence through plain causal attention
    model.setup(len(prompt) + T)
    seqs = torch.cat([torch.tensor([prompt]).expand(n, -1), tokens], dim=1)  # (n, M + T)
    full = model(seqs, torch.arange(seqs.size(1)))  # (n, M + T, V)
    for t, a in enumerate(bif):
        torch.testing.assert_close(a, full[:, len(prompt) - 1 + t], atol=1e-5, rtol=0)
    assert not torch.allclose(bif[1][0], bif[1][1], atol=1e-3), "samples fed different tokens should differ"


@pytest.mark.parametrize("name", CONFIGS)
def test_bifurcated_attention_against_concatenated_softmax(name):
    # the paper's form: one softmax over [context scores ; decode scores], computed in fp64
    cfg = ModelArgs.from_name(name)
    n, H, Hkv, D, M, T, slot = 3, cfg.n_head, cfg.n_kv_heads, cfg.head_dim, 29, 9, 4
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, H, 1, D, generator=g)
    kc, vc = torch.randn(Hkv, M, D, generator=g), torch.randn(Hkv, M, D, generator=g)
    kd, vd = torch.randn(n, Hkv, T, D, generator=g), torch.randn(n, Hkv, T, D, generator=g)
    out = bifurcated_attention(q, kc, vc, kd, vd, torch.tensor([slot]))
    rep = H // Hkv
    k = torch.cat([kc.expand(n, -1, -1, -1), kd[:, :, : slot + 1]], dim=2).repeat_interleave(rep, 1).double()
    v = torch.cat([vc.expand(n, -1, -1, -1), vd[:, :, : slot + 1]], dim=2).repeat_interleave(rep, 1).double()
    ref = torch.softmax(q.double() @ k.transpose(2, 3) / D**0.5, dim=-1) @ v  # (n, H, 1, D)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=20),
                                      dict(temperature=1.2, top_p=0.9), dict(temperature=0.0)])
def test_same_samples_both_attentions(name, sampling):
    model, prompt = tiny_model(name), prompt_ids(23)
    runs = [generate(model, prompt, num_samples=6, max_new_tokens=16, seed=7, attention=a, **sampling)
            for a in ("bifurcated", "standard")]
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].mean_logprob == pytest.approx(runs[1].mean_logprob, abs=1e-5)


def test_seeds_and_sample_diversity():
    model, prompt = tiny_model("tiny-gqa"), prompt_ids(20)
    run = lambda seed: generate(model, prompt, num_samples=8, max_new_tokens=16, temperature=1.0, seed=seed).tokens
    a, b, c = run(11), run(11), run(12)
    assert a == b
    assert a != c
    assert len({tuple(s) for s in a}) == 8, "the n samples of one run should differ"
    greedy = generate(model, prompt, num_samples=4, max_new_tokens=16, temperature=0.0).tokens
    assert all(s == greedy[0] for s in greedy)


def test_mean_logprob_matches_no_cache_model():
    model, prompt = tiny_model("tiny-mqa"), prompt_ids(15)
    gen = generate(model, prompt, num_samples=3, max_new_tokens=10, temperature=1.0, seed=0)
    model.setup(len(prompt) + 10)
    for toks, mean in zip(gen.tokens, gen.mean_logprob):
        seq = torch.tensor([prompt + toks])
        with torch.no_grad():
            lp = model(seq, torch.arange(seq.size(1)))[0].log_softmax(-1)
        ref = lp[len(prompt) - 1 : -1].gather(-1, seq[0, len(prompt) :, None]).mean()
        assert mean == pytest.approx(ref.item(), abs=1e-5)


def test_eos_stops_samples():
    model, prompt = tiny_model("tiny-mha"), prompt_ids(12)
    greedy = generate(model, prompt, num_samples=2, max_new_tokens=12, temperature=0.0).tokens[0]
    stop = greedy[5]
    first = greedy.index(stop)
    gen = generate(model, prompt, num_samples=2, max_new_tokens=12, temperature=0.0, eos_ids=[stop])
    assert gen.tokens == [greedy[:first]] * 2
    assert gen.finish_reason == ["eos", "eos"]
    free = generate(model, prompt, num_samples=2, max_new_tokens=12, temperature=0.0, eos_ids=[511 - stop])
    if 511 - stop not in greedy:
        assert free.finish_reason == ["length", "length"] and len(free.tokens[0]) == 12
    # every token an EOS: all samples end at their first token, and the loop stops early
    everything = generate(model, prompt, num_samples=3, max_new_tokens=64, temperature=1.0, seed=0,
                          eos_ids=range(512))
    assert everything.tokens == [[], [], []] and everything.stats["steps"] < 64


@pytest.mark.parametrize("V", [1, 63, 64, 1000, 32001])
def test_argmax_rows_matches_argmax(V):
    # the two-pass argmax: the same index as argmax, the first of equal maxima included
    torch.manual_seed(0)
    for x in (torch.randn(5, V), torch.randint(0, 3, (5, V)).float(), torch.full((2, V), float("-inf"))):
        assert torch.equal(argmax_rows(x), x.argmax(-1))
        assert torch.equal(torch.compile(argmax_rows)(x), x.argmax(-1))


def test_sample_tokens_follow_softmax():
    # the exponential race draws token i with probability softmax(logits / temperature)_i
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    draws = sample_tokens(logits.expand(40000, -1), 0.7, None, 1.0)  # (40000,)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert (freq - torch.softmax(logits / 0.7, -1)).abs().max() < 0.01  # about 4 standard errors


def test_sample_tokens_filters():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    top = logits.argmax(-1)
    assert torch.equal(sample_tokens(logits, 0.0, None, 1.0), top)
    assert torch.equal(sample_tokens(logits, 1.0, 1, 1.0), top)
    assert torch.equal(sample_tokens(logits, 1.0, None, 1e-6), top)
    draws = torch.stack([sample_tokens(logits, 1.0, 5, 1.0) for _ in range(300)])  # (300, 4)
    allowed = torch.topk(logits, 5, dim=-1).indices
    for row in range(4):
        seen = set(draws[:, row].tolist())
        assert seen <= set(allowed[row].tolist()) and len(seen) > 1
    # top_p: the kept set is the smallest prefix (by probability) whose mass reaches p
    probs = torch.softmax(logits, -1)
    draws = torch.stack([sample_tokens(logits, 1.0, None, 0.5) for _ in range(300)])
    for row in range(4):
        p, order = probs[row].sort(descending=True)
        keep = int((p.cumsum(0) < 0.5).sum()) + 1
        assert set(draws[:, row].tolist()) <= set(order[:keep].tolist())


@pytest.mark.parametrize("bad", [dict(num_samples=0), dict(max_new_tokens=0), dict(temperature=-0.1),
                                 dict(top_k=0), dict(top_p=0.0), dict(top_p=1.01), dict(attention="nope")])
def test_bad_arguments_raise(bad):
    with pytest.raises(ValueError):
        generate(tiny_model("tiny-mha"), prompt_ids(4), **bad)


def test_too_long_and_empty_prompts_raise():
    model = tiny_model("tiny-mha")  # block_size 512
    with pytest.raises(ValueError, match="maximum length"):
        generate(model, prompt_ids(500), max_new_tokens=13)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], max_new_tokens=4)


def test_same_sizes_reuse_caches_and_step():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny-mha")).eval()
    prompt = torch.randint(0, 512, (20,)).tolist()
    first = generate(model, prompt, num_samples=3, max_new_tokens=6, seed=1)
    caches, step = model.last_run[1:3]
    again = generate(model, prompt, num_samples=3, max_new_tokens=6, seed=1)
    assert model.last_run[1] is caches and model.last_run[2] is step and again.tokens == first.tokens
    held = [b for c in caches for b in c.buffers()]  # as the compiler's last graph holds them (free_caches)
    assert all(b.untyped_storage().nbytes() > 0 for b in held)
    other = generate(model, prompt, num_samples=4, max_new_tokens=6, seed=1)  # new sizes: new caches
    assert model.last_run[1] is not caches and len(other.tokens) == 4
    assert all(b.untyped_storage().nbytes() == 0 for b in held)  # the old ones' memory given back
    model.setup(26)  # caches dropped by hand: the next run makes new ones
    assert generate(model, prompt, num_samples=4, max_new_tokens=6, seed=1).tokens == other.tokens


def test_compiled_runs_of_more_sizes_than_the_recompile_limit():
    # dynamo compiles a function again for each new set of shapes and, with fullgraph, fails past its
    # recompile limit (8): a process that samples prompts of many lengths must go on, the same as eager
    model = tiny_model("tiny-gqa")
    kw = dict(num_samples=2, max_new_tokens=4, temperature=0.0)
    with torch._dynamo.config.patch(recompile_limit=2):
        for m in (9, 10, 11, 12):
            prompt = prompt_ids(m)
            assert generate(model, prompt, compile=True, **kw).tokens == generate(model, prompt, **kw).tokens


def test_compiled_step_is_one_graph_for_all_layers():
    # generate(compile=True): every layer through one compiled graph, the norm, head and sampling through
    # a second, however deep the model; the same tokens as the eager step (greedy), several prompts too
    import dataclasses
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(ModelArgs.from_name("tiny-gqa"), n_layer=4)).eval()
    prompts = [prompt_ids(20), prompt_ids(13, seed=3)]
    torch.compiler.reset()
    torch._dynamo.utils.counters.clear()
    kw = dict(num_samples=3, max_new_tokens=6, temperature=0.0)
    for run in (lambda c: [generate(model, prompts[0], compile=c, **kw).tokens],
                lambda c: [g.tokens for g in generate_many(model, prompts, prefix_ids=prompt_ids(9, seed=4),
                                                           compile=c, **kw)]):
        assert run(False) == run(True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4  # 2 for one prompt, 2 for several


def test_compiled_step_is_compiled_again_after_an_edit_of_the_sources(tmp_path, monkeypatch):
    # Inductor's on-disk cache is keyed on the traced graph, which does not hold the Python inside the
    # custom ops (the kernels' tiles): compiled.compile_graph puts the project's files into the key, so
    # the same sources hit the cache and an edited one compiles again
    import compiled
    from torch._dynamo.utils import counters
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    source = tmp_path / "kernels.py"
    source.write_text("TILES = 64\n")
    monkeypatch.setattr(compiled.SourcesInKey, "files", (source,))
    x = torch.randn(8, 16)

    def hits_and_misses():
        torch.compiler.reset()
        counters.clear()
        with torch._inductor.config.patch(fx_graph_cache=True):
            compiled.compile_graph(lambda x: torch.tanh(x) * 3 + x.sum(-1, keepdim=True))(x)
        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    assert hits_and_misses() == (0, 1)
    assert hits_and_misses() == (1, 0)
    source.write_text("TILES = 128\n")
    assert hits_and_misses() == (0, 1)
    assert hits_and_misses() == (1, 0)
