# Correctness on a GPU in bf16: bifurcated == standard attention (and == an fp64 reference), and the
# compiled, CUDA-graphed decode step == the eager one. Skips where no GPU is present.
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import quantize
from bifurcated import bifurcated_attention, make_caches, prefix_attention
from compiled import prefill_step
from generate import generate, generate_many
from model import ModelArgs, Transformer
from model import swiglu as model_swiglu
from test_generate import step_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("Hkv", [32, 8, 1])
@pytest.mark.parametrize("n", [1, 7, 8, 32, 64, 512])  # 8 (GQA), 32 and 64 (MHA): rows_tiles' one wave
@pytest.mark.parametrize("M,slot", [(1000, 0), (4097, 37), (8191, 127)])
def test_bifurcated_attention_bf16(fast, Hkv, n, M, slot):
    # contexts that are not multiples of any block size; the first and the last decode slot
    check_decode_attention(fast, Hkv, n, M, slot, T=128)


@pytest.mark.parametrize("M,slot", [(8200, 63), (1000, 0)])
def test_side_stream_attention_bf16(M, slot, monkeypatch):
    # MHA, 512 samples: the own slots on a second stream beside the context (at 1000 keys, forced)
    bt = pytest.importorskip("bifurcated_triton")
    monkeypatch.setattr(bt, "SIDE_CONTEXT", min(M, bt.SIDE_CONTEXT))
    assert bt.side_rows(torch.empty(512, 32, 1, 128, device="cuda"), torch.empty(32, M, 128, device="cuda"))
    check_decode_attention(True, 32, 512, M, slot, T=128)


@pytest.mark.parametrize("Hkv,n,M", [(32, 256, 8192), (8, 256, 8192), (8, 64, 4096), (32, 256, 8191)])
def test_cudnn_context_bf16(Hkv, n, M):
    # 128-row blocks on a Hopper GPU: the context by cuDNN's attention in the plan's equal splits
    # (8191 keys are not two equal ones: ours; nor fp32, which cuDNN's attention lacks), its partials merged with ours
    bt = pytest.importorskip("bifurcated_triton")
    q = torch.empty(n, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.empty(Hkv, M, 128, device="cuda", dtype=torch.bfloat16)
    tiles, level = bt.context_level(n * 32 // Hkv, k, k, bt.num_sms(q), bt.Tiles())
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert bt.cudnn_context(q, k, None, level.plan, tiles) == (hopper and M % level.plan[1] == 0)
    assert not bt.cudnn_context(q.float(), k.float(), None, level.plan, tiles)
    check_decode_attention(True, Hkv, n, M, 100, T=128)


@pytest.mark.parametrize("Hkv", [32, 8])
@pytest.mark.parametrize("n", [1, 3])
def test_long_decode_split_bf16(Hkv, n):
    # few samples and many decode slots: the own slots are split over the SMs, then merged apart
    bt = pytest.importorskip("bifurcated_triton")
    assert not bt.own_fused(1, n, Hkv, 2048, bt.num_sms(torch.empty(0, device="cuda")))
    check_decode_attention(True, Hkv, n, 3001, 1999, T=2048)


def check_decode_attention(fast: bool, Hkv: int, n: int, M: int, slot: int, T: int):
    attend = bifurcated_attention
    if fast:
        attend = pytest.importorskip("bifurcated_triton").decode_attention
    H, D = 32, 128
    g = torch.Generator("cuda").manual_seed(n * M + Hkv)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16)
    q, kc, vc, kd, vd = rnd(n, H, 1, D), rnd(Hkv, M, D), rnd(Hkv, M, D), rnd(n, Hkv, T, D), rnd(n, Hkv, T, D)
    out = attend(q, kc, vc, kd, vd, torch.tensor([slot], device="cuda"))
    assert out.shape == q.shape and out.dtype == q.dtype
    for i in range(0, n, 16):  # the fp64 reference, 16 samples at a time to bound its memory
        s = slice(i, min(i + 16, n))
        m = s.stop - s.start
        k = torch.cat([kc.expand(m, -1, -1, -1), kd[s, :, : slot + 1]], dim=2).double().repeat_interleave(H // Hkv, 1)
        v = torch.cat([vc.expand(m, -1, -1, -1), vd[s, :, : slot + 1]], dim=2).double().repeat_interleave(H // Hkv, 1)
        ref = torch.softmax(q[s].double() @ k.transpose(2, 3) / D**0.5, dim=-1) @ v  # (m, H, 1, D)
        assert rel_err(out[s], ref) < 1e-2


@pytest.mark.parametrize("per_row", [False, True], ids=["one-position", "positions-per-row"])
@pytest.mark.parametrize("Hkv", [32, 8, 1])
def test_rope_store_matches_plain(Hkv, per_row):
    # the decode step's RoPE + cache write in one kernel == bifurcated.store_decode
    from bifurcated import store_decode
    from model import precompute_freqs_cis
    rope_store = pytest.importorskip("bifurcated_triton").rope_store
    B, H, D, T = 5, 32, 128, 64
    g = torch.Generator("cuda").manual_seed(Hkv)
    q, k, v = torch.randn(B, 1, (H + 2 * Hkv) * D, generator=g, device="cuda").to(torch.bfloat16).split(
        [H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(B, 1, H, D), k.view(B, 1, Hkv, D), v.view(B, 1, Hkv, D)  # views of one qkv product
    table = precompute_freqs_cis(4096, D, 10000.0, None, "cuda")
    freqs = table[torch.randint(100, 4000, (B, 1), device="cuda")] if per_row else table[torch.tensor([3001], device="cuda")]
    caches = [torch.randn(B, Hkv, T, D, generator=g, device="cuda").to(torch.bfloat16) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    pos = torch.full((B,), 1000 + 17, device="cuda")  # slot pos[0] - 1000
    out = rope_store(q, k, v, freqs, *caches, pos, 1000)
    ref = store_decode(q, k, v, freqs, *ref_caches, torch.tensor([17], device="cuda"))
    # the same fp32 math; the kernel may fuse a multiply-add that PyTorch rounds twice: 1 bf16 step at most
    torch.testing.assert_close(out, ref.contiguous(), rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(caches[0], ref_caches[0], rtol=2**-7, atol=1e-3)
    assert torch.equal(caches[1], ref_caches[1])  # v: copied as it is


@pytest.mark.parametrize("per_row", [False, True], ids=["one-position", "positions-per-row"])
@pytest.mark.parametrize("Hkv,n", [(32, 1), (32, 8), (32, 64), (8, 32), (1, 7), (32, 256)])
def test_rope_in_attention_launch_matches_apart(Hkv, n, per_row):
    # RoPE + the store of the step's k and v inside the attention's launch (the plan of few samples; at
    # n = 256 the op takes them apart) == rope_store, then decode_attention
    from model import precompute_freqs_cis
    bt = pytest.importorskip("bifurcated_triton")
    H, D, M, T, slot = 32, 128, 4097, 128, 37
    g = torch.Generator("cuda").manual_seed(n + Hkv)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)
    q, k, v = rnd(n, 1, (H + 2 * Hkv) * D).split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(n, 1, H, D), k.view(n, 1, Hkv, D), v.view(n, 1, Hkv, D)  # views of one qkv product
    table = precompute_freqs_cis(8192, D, 10000.0, None, "cuda")
    freqs = table[M + slot + torch.arange(n if per_row else 1, device="cuda")][:, None]
    kc, vc, kd, vd = rnd(Hkv, M, D), rnd(Hkv, M, D), rnd(n, Hkv, T, D), rnd(n, Hkv, T, D)
    kd2, vd2 = kd.clone(), vd.clone()
    pos = torch.tensor([M + slot], device="cuda")
    out = bt.rope_decode_attention(q, k, v, freqs, kc, vc, kd2, vd2, pos, M)
    ref = bt.decode_attention(bt.rope_store(q, k, v, freqs, kd, vd, pos, M), kc, vc, kd, vd, pos, M)
    assert torch.equal(kd2, kd) and torch.equal(vd2, vd)
    assert rel_err(out, ref) < 1e-3


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("per_row", [False, True], ids=["one-position", "positions-per-row"])
@pytest.mark.parametrize("Hkv,n", [(32, 1), (32, 8), (32, 32), (32, 64), (8, 32), (8, 5)])
def test_qkv_rope_matches_apart(kind, Hkv, n, per_row, monkeypatch):
    # the qkv layer with RoPE and the store of k and v in its kernel's epilogue (linear_triton.qkv_rope) ==
    # the layer, then rope_store. The epilogue rotates the fp32 sums, rope_store their bf16 roundings: q and
    # k within a bf16 step; v, the same sums rounded once, bit-equal
    import linear_triton as lt
    from model import precompute_freqs_cis
    bt = pytest.importorskip("bifurcated_triton")
    H, D, K, M, T, slot = 32, 128, 4096, 4097, 128, 37
    g = torch.Generator("cuda").manual_seed(n + Hkv)
    w = torch.randn((H + 2 * Hkv) * D, K, generator=g, device="cuda") * 0.02
    if kind == "bf16":
        layer = lt.TritonLinear(torch.nn.Parameter(w.to(torch.bfloat16)))
    elif kind == "int8":
        layer = quantize.Int8Linear(K, w.size(0))
        layer.weight, layer.scales = quantize.quantize_int8(w)
    else:
        layer = quantize.Int4Linear(K, w.size(0), 128)
        layer.weight, layer.scales_and_zeros = quantize.quantize_int4(w, 128)
        layer.pack_for_cuda()
    x = torch.randn(n, 1, K, generator=g, device="cuda").to(torch.bfloat16)
    # the model's: int8's wide wqkv (ROPE_KINDS); bf16's too when asked (ab_step's rope-bf16). Not: int4 (PyTorch's
    # int4 kernel, the one-row one, or splits of K); int8's narrow layers, in splits of K
    assert (lt.rope_operands(layer, x, D) is not None) == (kind == "int8" and w.size(0) >= lt.WIDE)
    monkeypatch.setattr(lt, "ROPE_KINDS", ("bf16", "int8"))
    ops = lt.rope_operands(layer, x, D)
    if ops is None:
        assert kind == "int4" or (kind == "int8" and w.size(0) < lt.WIDE)
        return
    table = precompute_freqs_cis(8192, D, 10000.0, None, "cuda")
    freqs = table[M + slot + torch.arange(n if per_row else 1, device="cuda")][:, None]
    kd, vd = (torch.randn(n, Hkv, T, D, generator=g, device="cuda").to(torch.bfloat16) for _ in range(2))
    kd2, vd2 = kd.clone(), vd.clone()
    pos = torch.tensor([M + slot], device="cuda")
    out = lt.qkv_rope(x, *ops, freqs, kd2, vd2, pos, M)
    q, k, v = layer(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
    ref = bt.rope_store(q.view(n, 1, H, D), k.view(n, 1, Hkv, D), v.view(n, 1, Hkv, D), freqs, kd, vd, pos, M)
    assert out.shape == ref.shape == (n, H, 1, D)
    assert rel_err(out, ref) < 2**-8 and rel_err(kd2[:, :, slot], kd[:, :, slot]) < 2**-8
    assert torch.equal(vd2, vd)
    kd2[:, :, slot] = kd[:, :, slot]
    assert torch.equal(kd2, kd)  # the other slots untouched


@pytest.mark.parametrize("Hkv", [32, 8, 1])
def test_rope_store_context_matches_plain(Hkv):
    # the prefill's RoPE + context-cache write in one kernel == the same in plain PyTorch; a prompt
    # that continues a prefix (positions from 300 on) into a level longer than it
    from model import precompute_freqs_cis, rotate_heads_first
    rope_store_context = pytest.importorskip("bifurcated_triton").rope_store_context
    S, L, H, D = 1001, 1100, 32, 128
    g = torch.Generator("cuda").manual_seed(Hkv)
    q, k, v = torch.randn(1, S, (H + 2 * Hkv) * D, generator=g, device="cuda").to(torch.bfloat16).split(
        [H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(1, S, H, D), k.view(1, S, Hkv, D), v.view(1, S, Hkv, D)  # views of one qkv product
    freqs = precompute_freqs_cis(4096, D, 10000.0, None, "cuda")[300 : 300 + S]  # (S, D/2, 2)
    caches = [torch.randn(Hkv, L, D, generator=g, device="cuda").to(torch.bfloat16) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    out = rope_store_context(q, k, v, freqs, *caches)[None].transpose(1, 2)  # (1, H, S, D)
    ref, k_ref, v_ref = rotate_heads_first(q, k, v, freqs)  # (1, H, S, D), (1, Hkv, S, D) x 2
    ref_caches[0][:, :S], ref_caches[1][:, :S] = k_ref[0], v_ref[0]
    assert out.shape == ref.shape
    # the same fp32 math; the kernel may fuse a multiply-add that PyTorch rounds twice: 1 bf16 step at most
    torch.testing.assert_close(out, ref, rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(caches[0], ref_caches[0], rtol=2**-7, atol=1e-3)
    assert torch.equal(caches[1], ref_caches[1])  # v copied as it is, and positions S.. untouched


def test_prefill_norm_and_swiglu_kernels_match_plain():
    from model import RMSNorm
    lt = pytest.importorskip("linear_triton")
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(3, 333, 4096, generator=g, device="cuda").to(torch.bfloat16)
    norm = RMSNorm(4096, 1e-5).to("cuda", torch.bfloat16)
    norm.weight.data = torch.rand(4096, generator=g, device="cuda").to(torch.bfloat16) + 0.5
    fast = lt.TritonRMSNorm(4096, 1e-5)
    fast.weight = norm.weight
    # the same roundings (fp32 norm to bf16, then times the gain); the sums' order differs: 1 bf16 step at most
    torch.testing.assert_close(fast(x), norm(x), rtol=2**-7, atol=0)
    h = 4 * torch.randn(999, 2 * 11008, generator=g, device="cuda").to(torch.bfloat16)
    torch.testing.assert_close(lt.swiglu_rows(h), model_swiglu(h), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("n_kv_heads", [32, 8, 1])
def test_bifurcated_equals_standard_bf16(n_kv_heads):
    # the Llama-2-7B layer shape, two layers, a context that is not a multiple of any block size
    cfg = dataclasses.replace(ModelArgs.from_name("Llama-2-7B"), n_layer=2, vocab_size=4096, n_kv_heads=n_kv_heads)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(cfg).to(torch.bfloat16).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1531,)).tolist()
    tokens = torch.randint(0, cfg.vocab_size, (16, 8), device="cuda")
    std = step_logits(model, "standard", prompt, tokens)
    for a, b in zip(step_logits(model, "bifurcated", prompt, tokens), std):
        assert rel_err(a, b) < 1e-2
    # as checkpoint.load_model runs it on CUDA: the linear layers on the Triton kernel, the residual
    # adds in it (compiled: test_compiled_layers_on_triton_match_eager)
    pytest.importorskip("linear_triton").use_kernels(model)
    for a, b in zip(step_logits(model, "bifurcated", prompt, tokens), std):
        assert rel_err(a, b) < 1e-2


def on_kernels(n_layer: int) -> Transformer:
    # Mistral-7B's layers (GQA), a small vocabulary and MLP, in bf16 with the Triton kernels, as
    # checkpoint.load_model has a model on CUDA
    cfg = dataclasses.replace(ModelArgs.from_name("Mistral-7B"), n_layer=n_layer, vocab_size=4096,
                              intermediate_size=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(cfg).to(torch.bfloat16).eval()
    pytest.importorskip("linear_triton").use_kernels(model)
    return model


def test_compiled_layers_on_triton_match_eager():
    # the decode step as checkpoint.load_model runs it on CUDA (the linear layers on the Triton kernel,
    # residual adds in it), compiled, against the same model eager
    model = on_kernels(n_layer=1)
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (100,)).tolist()
    tokens = torch.randint(0, cfg.vocab_size, (8, 4), device="cuda")
    eager = step_logits(model, "bifurcated", prompt, tokens)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)  # one graph for the prefill, one for decode
    for a, b in zip(step_logits(compiled, "bifurcated", prompt, tokens), eager):
        assert rel_err(a, b) < 1e-2


def test_cudnn_context_in_the_step_matches_standard(monkeypatch):
    # 64 samples of GQA (256 rows a KV head): on a Hopper GPU the context's launch by cuDNN's attention,
    # eager and compiled, against standard attention
    bt = pytest.importorskip("bifurcated_triton")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("cuDNN takes the context's launch on Hopper GPUs only")
    called, launch = [], bt.launch_cudnn
    monkeypatch.setattr(bt, "launch_cudnn", lambda *args: called.append(1) or launch(*args))
    model = on_kernels(n_layer=1)
    prompt = torch.randint(0, model.config.vocab_size, (256,)).tolist()
    tokens = torch.randint(0, model.config.vocab_size, (64, 4), device="cuda")
    std = step_logits(model, "standard", prompt, tokens)
    bif = step_logits(model, "bifurcated", prompt, tokens)
    assert called
    compiled = step_logits(torch.compile(model, fullgraph=True, dynamic=False), "bifurcated", prompt, tokens)
    for a, b, c in zip(bif, compiled, std):
        assert rel_err(a, c) < 1e-2 and rel_err(b, c) < 1e-2


def greedy_runs(config: str, num_samples: int, max_new_tokens: int):
    """A tiny random model of `config` on CUDA and a 50-token prompt: run(compile), generate's greedy
    samples, and the runs eager and compiled."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(ModelArgs.from_name(config)).eval()
    prompt = torch.randint(0, 512, (50,)).tolist()
    run = lambda c: generate(model, prompt, num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=0.0,
                             compile=c).tokens
    return run, [run(False), run(True)]


def test_compiled_step_matches_eager():
    _, runs = greedy_runs("tiny-gqa", 4, 24)
    assert runs[0] == runs[1]


def test_compiled_runs_of_more_sizes_than_the_recompile_limit():
    # each new size compiles and records the step again, dropping what earlier sizes compiled: past
    # dynamo's recompile limit the runs go on, the same as eager
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(ModelArgs.from_name("tiny-gqa")).eval()
    kw = dict(num_samples=4, max_new_tokens=12, temperature=0.0)
    with torch._dynamo.config.patch(recompile_limit=2):
        for m in (40, 41, 42, 43):
            prompt = torch.randint(0, 512, (m,)).tolist()
            assert generate(model, prompt, compile=True, **kw).tokens == generate(model, prompt, **kw).tokens


def test_side_stream_attention_compiled_matches_eager(monkeypatch):
    # MHA with 512 samples: the own slots on a second stream beside the context launch (an opaque op),
    # inside the compiled, CUDA-graphed step; eager, and the same samples as with one stream
    bt = pytest.importorskip("bifurcated_triton")
    called = []
    monkeypatch.setattr(bt, "SIDE_CONTEXT", 1)  # a short prompt takes the second stream too
    op = bt.decode_attention_side
    monkeypatch.setattr(bt, "decode_attention_side", lambda *a: called.append(1) or op(*a))
    run, runs = greedy_runs("tiny-mha", 512, 12)
    assert runs[0] == runs[1] and called
    monkeypatch.setattr(bt, "SIDE_ROWS", 10**9)  # the traced op, everything on one stream
    assert run(False) == runs[0]


def test_compiled_sampling_draws_fresh_numbers():
    # the recorded CUDA graph's random numbers advance at each replay: with uniform logits (a zero
    # head) each sample's tokens vary from step to step, and a seed still gives the same samples
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(ModelArgs.from_name("tiny-gqa")).eval()
    model.output.weight.data.zero_()
    prompt = torch.randint(0, 512, (50,)).tolist()
    runs = [generate(model, prompt, num_samples=4, max_new_tokens=24, temperature=1.0, seed=s, compile=True).tokens
            for s in (1, 1, 2)]
    assert all(len(set(row)) > 12 for row in runs[0])  # uniform over 512 tokens: about 24 distinct
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_prefill_graph_replays_new_prompts():
    # with compile, the second run of a prompt length records its prefill as a CUDA graph, which
    # later runs replay with their own tokens: the same samples as eager runs of those prompts
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(ModelArgs.from_name("tiny-gqa")).eval()
    a, b = (torch.randint(0, 512, (50,)).tolist() for _ in range(2))
    run = lambda p, c: generate(model, p, num_samples=4, max_new_tokens=16, temperature=0.0, compile=c).tokens
    eager = [run(p, False) for p in (a, b)]
    assert [run(p, True) for p in (a, a, b, a)] == [eager[0], eager[0], eager[1], eager[0]]
    assert model.last_run[3].graph is not None


def test_prefill_graph_of_kernels_matches_eager():
    # the prefill as generate.py records it on a model with the Triton kernels (norms, RoPE + store,
    # SwiGLU) and the cuBLAS products: replayed with new ids, the same logits and context cache
    model = on_kernels(n_layer=2)
    cfg, S = model.config, 300
    model.setup(S + 8, make_caches("bifurcated", cfg, 2, S, 8, torch.bfloat16, torch.device("cuda")))
    a, b = torch.randint(0, cfg.vocab_size, (2, 1, S), device="cuda")
    eager = model(b, torch.arange(S, device="cuda"), last_only=True).clone()
    kv = model.layers[1].attention.kv_cache
    cache = kv.k_ctx.clone(), kv.v_ctx.clone()
    prefill = prefill_step(model, S, compile=True)
    prefill(a), prefill(a)  # runs it, then records it
    out = prefill(b)
    assert prefill.graph is not None and rel_err(out, eager) < 1e-3
    assert rel_err(kv.k_ctx, cache[0]) < 1e-3 and rel_err(kv.v_ctx, cache[1]) < 1e-3


def layer_weights(kind: str, N: int, K: int, x: torch.Tensor, g: torch.Generator):
    # random bf16 weights (N, K), or int8 with a scale per output channel (N,); and x W^T in fp64
    if kind == "bf16":
        w, s = (torch.randn(N, K, generator=g, device="cuda") * 0.02).to(torch.bfloat16), None  # (N, K)
        return w, s, x.double() @ w.double().t()
    w = torch.randint(-127, 128, (N, K), generator=g, device="cuda", dtype=torch.int8)  # (N, K)
    s = (torch.rand(N, generator=g, device="cuda") * 1e-3).to(torch.bfloat16)  # (N,)
    return w, s, (x.double() @ w.double().t()) * s.double()


@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("M", [1, 7, 32, 64, 65])  # 65: above the kernel's rows, cuBLAS takes it
@pytest.mark.parametrize("N,K", [(12288, 4096), (22016, 4096), (4096, 11008), (6144, 4096), (136, 96)])
def test_linear_kernel(kind, M, N, K, swiglu):
    linear_triton = pytest.importorskip("linear_triton")
    g = torch.Generator("cuda").manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g, device="cuda").to(torch.bfloat16)  # (M, K)
    act = model_swiglu if swiglu else lambda y: y  # swiglu: the rows are [gate; up], y = silu(gate) * up
    if kind == "int4":  # groups of 32 (K = 96 takes no larger one); above MAX_M rows, dequantize + cuBLAS
        packed, sz = quantize.quantize_int4(torch.randn(N, K, generator=g, device="cuda") * 0.02, 32)
        ref = act(x.double() @ quantize.dequantize_int4(packed, sz, 32).double().t())
        assert rel_err(linear_triton.run_linear(x, packed, sz, group=32, swiglu=swiglu), ref) < 1e-2
        return
    linear = linear_triton.linear
    w, s, ref = layer_weights(kind, N, K, x, g)
    ref = act(ref)
    out = linear(x[None], w, s, swiglu=swiglu)  # leading dims kept
    assert out.shape == (1, M, N // 2 if swiglu else N) and out.dtype == torch.bfloat16
    assert rel_err(out[0], ref) < 1e-2


def tma_on(monkeypatch):
    # the weight's tiles (bf16, int8) and the attention's context blocks through tensor descriptors (Tiles.tma)
    lt, bt = pytest.importorskip("linear_triton"), pytest.importorskip("bifurcated_triton")
    tiles, rows = lt.default_tiles, bt.rows_tiles
    monkeypatch.setattr(lt, "default_tiles", lambda *a, **k: dataclasses.replace(tiles(*a, **k), tma=True))
    monkeypatch.setattr(bt, "rows_tiles", lambda *a: dataclasses.replace(rows(*a), tma=True))


@pytest.mark.parametrize("epilogue", ["plain", "swiglu", "residual"])
@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("M", [1, 7, 32, 64])
@pytest.mark.parametrize("N,K", [(12288, 4096), (22016, 4096), (4096, 11008), (136, 96)])
def test_linear_kernel_tma(kind, M, N, K, epilogue, monkeypatch):
    # Tiles.tma on each layer's default tiles (int8's f16 and digits tiles too), against fp64; rows and channels
    # past N and K come in as zeros
    tma_on(monkeypatch)
    linear_triton = pytest.importorskip("linear_triton")
    g = torch.Generator("cuda").manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g, device="cuda").to(torch.bfloat16)  # (M, K)
    w, s, ref = layer_weights(kind, N, K, x, g)
    res = torch.randn(M, N, generator=g, device="cuda").to(torch.bfloat16) * ref.std().item()
    kw = dict(swiglu=epilogue == "swiglu", residual=res if epilogue == "residual" else None)
    ref = model_swiglu(ref) if kw["swiglu"] else ref + res.double() if epilogue == "residual" else ref
    assert rel_err(linear_triton.run_linear(x, w, s, **kw), ref) < 1e-2


@pytest.mark.parametrize("Hkv", [32, 8])
@pytest.mark.parametrize("n", [1, 8, 32, 64, 256])
def test_bifurcated_attention_tma_bf16(Hkv, n, monkeypatch):
    # the context's whole blocks through tensor descriptors (bifurcated_triton.Tiles.tma), a last block in part
    tma_on(monkeypatch)
    check_decode_attention(True, Hkv, n, 4097, 37, T=128)


def test_compiled_layers_with_tma_match_eager(monkeypatch):
    # the compiled step with the TMA on: its kernels launch through the opaque op tma::launch (tma.py)
    tma_on(monkeypatch)
    test_compiled_layers_on_triton_match_eager()


@pytest.mark.parametrize("block_n,warps,f16", [(32, 4, False), (64, 4, False), (128, 8, False), (32, 4, True),
                                               (64, 4, True)])
@pytest.mark.parametrize("K", [256, 208])  # 208: a last K tile in part
def test_linear_kernel_int8_every_value(block_n, warps, f16, K):
    # each int8 value, -128 included, through the kernel's conversion to bf16 on 32-channel tiles (mma.sync)
    # and wider ones (wgmma), and to fp16 by bit operations (f16): one-hot rows of x pick single weights, so
    # the product is exact
    linear_triton = pytest.importorskip("linear_triton")
    N, M = 512, 16
    n, k = torch.arange(N, device="cuda"), torch.arange(K, device="cuda")
    w = ((n[:, None] * 7 + k[None, :]) % 256 - 128).to(torch.int8)  # (N, K): each value in every column
    pick = torch.arange(M, device="cuda") * 13 % K  # (M,): the input channel each row of x selects
    x = torch.zeros(M, K, device="cuda", dtype=torch.bfloat16)  # (M, K)
    x[torch.arange(M), pick] = 1.0
    s = torch.ones(N, device="cuda", dtype=torch.bfloat16)  # (N,)
    tiles = linear_triton.Tiles(block_n=block_n, block_k=128, waves=1, stages=3, warps=warps, f16=f16)
    out = linear_triton.run_linear(x, w, s, tiles=tiles)  # (M, N)
    assert torch.equal(out, w.t()[pick].to(torch.bfloat16))


@pytest.mark.parametrize("M", [1, 32])
def test_linear_kernel_int8_f16_range(M):
    # int8 with x in fp16 (Tiles.f16): bf16 activations far past fp16's largest number (65504) and far
    # below its smallest normal one, in one row, against the fp64 product
    linear_triton = pytest.importorskip("linear_triton")
    N, K = 256, 1024
    g = torch.Generator("cuda").manual_seed(M)
    x = torch.randn(M, K, generator=g, device="cuda") * torch.logspace(-6, 5, K, device="cuda")  # |x| up to 1e5
    x = x.to(torch.bfloat16)[:, torch.randperm(K, generator=g, device="cuda")]  # (M, K)
    w = torch.randint(-127, 128, (N, K), generator=g, device="cuda", dtype=torch.int8)  # (N, K)
    s = (torch.rand(N, generator=g, device="cuda") * 1e-3).to(torch.bfloat16)  # (N,)
    ref = (x.double() @ w.double().t()) * s.double()
    tiles = linear_triton.Tiles(block_n=64, block_k=128, waves=1, stages=4, f16=True)
    out = linear_triton.run_linear(x, w, s, tiles=tiles)
    assert out.isfinite().all() and rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("tiles", [(32, 256, 3, 4), (64, 128, 4, 4), (128, 128, 3, 8)], ids=str)
@pytest.mark.parametrize("M", [1, 32, 64])
@pytest.mark.parametrize("N,K,swiglu", [(12288, 4096, False), (22016, 4096, True), (4096, 11008, False)])
def test_linear_kernel_int8_digits(M, N, K, swiglu, tiles):
    # int8 with x in digits (Tiles.digits: int8 products of x's 16-bit fixed point, mma.sync at 32 channels,
    # wgmma from 64), split K and not, with a residual: against the fp64 product
    linear_triton = pytest.importorskip("linear_triton")
    g = torch.Generator("cuda").manual_seed(M * N + K)
    x = (torch.randn(M, K, generator=g, device="cuda") * torch.logspace(-2, 2, K, device="cuda")).to(torch.bfloat16)
    w = torch.randint(-127, 128, (N, K), generator=g, device="cuda", dtype=torch.int8)  # (N, K)
    s = (torch.rand(N, generator=g, device="cuda") * 1e-3).to(torch.bfloat16)  # (N,)
    res = torch.randn(M, N, generator=g, device="cuda").to(torch.bfloat16)
    ref = (x.double() @ w.double().t()) * s.double()
    block_n, block_k, stages, warps = tiles
    t = linear_triton.Tiles(block_n=block_n, block_k=block_k, waves=1, stages=stages, warps=warps, digits=True)
    if swiglu:
        assert rel_err(linear_triton.run_linear(x, w, s, tiles=t, swiglu=True), model_swiglu(ref)) < 1e-2
    else:
        assert rel_err(linear_triton.run_linear(x, w, s, tiles=t, residual=res), ref + res.double()) < 1e-2


@pytest.mark.parametrize("xperm", [False, True], ids=["x", "xperm"])
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("group", [64, 128, 256])
@pytest.mark.parametrize("M", [1, 5, 32, 64])
def test_linear_kernel_int4_in_bf16(group, M, swiglu, xperm):
    # groups of 64 and more, bf16 x: the weights dequantized to bf16 in registers (linear_triton.DEQ),
    # against the fp64 product; a mean far from zero in some rows, so that the zero points matter; with
    # xperm, x's channels reordered to the weight's (the wide layers' tiles), K tiles of 64 and 128
    linear_triton = pytest.importorskip("linear_triton")
    tiles = linear_triton.Tiles(block_n=64, block_k=128 if M > 5 else 64, stages=4, xperm=True) if xperm else None
    N, K = 1536, 2048
    g = torch.Generator("cuda").manual_seed(group + M)
    w = torch.randn(N, K, generator=g, device="cuda") * 0.02 + torch.randn(N, 1, generator=g, device="cuda") * 0.05
    x = torch.randn(M, K, generator=g, device="cuda").to(torch.bfloat16)  # (M, K)
    packed, sz = quantize.quantize_int4(w, group)
    ref = x.double() @ quantize.dequantize_int4(packed, sz, group).double().t()  # (M, N)
    if swiglu:
        out = linear_triton.run_linear(x, packed, sz, tiles, group=group, swiglu=True)
        assert rel_err(out, model_swiglu(ref)) < 1e-2
    else:  # and the residual add
        res = torch.randn(M, N, generator=g, device="cuda").to(torch.bfloat16)  # (M, N)
        assert rel_err(linear_triton.run_linear(x, packed, sz, tiles, group=group), ref) < 1e-2
        out = linear_triton.run_linear(x, packed, sz, tiles, group=group, residual=res)
        assert rel_err(out, ref + res.double()) < 1e-2


@pytest.mark.parametrize("tiles", [(4, None, 4), (8, 512, 4), (2, 128, 2), (16, 1024, 8), (64, 256, 4)],
                         ids=lambda t: "n%d-k%s-w%d" % t)
@pytest.mark.parametrize("M", [1, 3])  # 3: the tensor-core kernel, whatever the tiles ask
def test_linear_kernel_int4_gemv(M, tiles):
    # int4 at one row on the CUDA cores (Tiles.gemv): nibbles to fp16 and the products by inline PTX, rows a
    # program, groups a step (20 of them: the last step masked), N not a multiple of the program's rows,
    # zero points that matter; plain, residual, swiglu
    linear_triton = pytest.importorskip("linear_triton")
    N, K, group = 1000, 2560, 128
    g = torch.Generator("cuda").manual_seed(M)
    w = torch.randn(N, K, generator=g, device="cuda") * 0.02 + torch.randn(N, 1, generator=g, device="cuda") * 0.05
    x = torch.randn(M, K, generator=g, device="cuda").to(torch.bfloat16)  # (M, K)
    res = torch.randn(M, N, generator=g, device="cuda").to(torch.bfloat16)  # (M, N)
    packed, sz = quantize.quantize_int4(w, group)
    ref = x.double() @ quantize.dequantize_int4(packed, sz, group).double().t()  # (M, N)
    t = linear_triton.Tiles(block_n=tiles[0], block_k=tiles[1], warps=tiles[2], stages=1, gemv=True)
    run = lambda **kw: linear_triton.run_linear(x, packed, sz, tiles=t, group=group, **kw)
    assert rel_err(run(), ref) < 1e-2
    assert rel_err(run(residual=res), ref + res.double()) < 1e-2
    assert rel_err(run(swiglu=True), model_swiglu(ref)) < 1e-2
    if M == 1:  # the activations as the next layer's x pairs (pairs=True): gemv_input's bits, and a layer after
        # (F = 640: 5 groups, a masked step; 4 rows a program) gives from them what it gives from x
        w13, sz13 = quantize.quantize_int4(torch.randn(1280, K, generator=g, device="cuda") * 0.02, group)
        act = linear_triton.run_linear(x, w13, sz13, tiles=t, group=group, swiglu=True)
        pairs = linear_triton.run_linear(x, w13, sz13, tiles=t, group=group, swiglu=True, pairs=True)
        assert pairs.dtype == torch.int16 and torch.equal(pairs, linear_triton.gemv_input(act))
        w2, sz2 = quantize.quantize_int4(torch.randn(256, 640, generator=g, device="cuda") * 0.02, group)
        t2 = linear_triton.Tiles(block_n=4, stages=1, gemv=True)
        res2 = torch.randn(1, 256, generator=g, device="cuda").to(torch.bfloat16)
        out = linear_triton.run_linear(pairs, w2, sz2, tiles=t2, group=group, residual=res2)
        assert out.dtype == torch.bfloat16 and torch.equal(
            out, linear_triton.run_linear(act, w2, sz2, tiles=t2, group=group, residual=res2))


def test_linear_kernel_int4_gemv_range():
    # the one-row int4 kernel's fp16 pairs (x scaled by 2^-GEMV_SHIFT): bf16 activations from 1e-6 to 1e5 in
    # one row, against the fp64 product
    linear_triton = pytest.importorskip("linear_triton")
    N, K, group = 512, 4096, 128
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, K, generator=g, device="cuda") * torch.logspace(-6, 5, K, device="cuda")
    x = x.to(torch.bfloat16)[:, torch.randperm(K, generator=g, device="cuda")]  # (1, K)
    packed, sz = quantize.quantize_int4(torch.randn(N, K, generator=g, device="cuda") * 0.02, group)
    ref = x.double() @ quantize.dequantize_int4(packed, sz, group).double().t()  # (1, N)
    out = linear_triton.run_linear(x, packed, sz, tiles=linear_triton.Tiles(block_n=4, stages=1, gemv=True),
                                   group=group)
    assert out.isfinite().all() and rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("Hkv", [32, 8, 1])
@pytest.mark.parametrize("Mp,lens,n", [(0, [100, 7, 513], 5), (4097, [1, 300], 5), (1000, [64], 5),
                                       (4096, [512, 200], 128)])  # 256 rows: the prefix's launch by cuDNN
def test_prefix_kernel_bf16(Hkv, Mp, lens, n):
    # several prompts: prefix, each prompt's own tokens (unequal lengths), each sample's own
    kernel = pytest.importorskip("bifurcated_triton").prefix_decode_attention
    H, D, T, slot = 32, 128, 64, 37
    Np, L = len(lens), max(lens)
    g = torch.Generator("cuda").manual_seed(Mp + Hkv)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16)
    args = [rnd(Np * n, H, 1, D), rnd(Hkv, Mp, D), rnd(Hkv, Mp, D), rnd(Np, Hkv, L, D), rnd(Np, Hkv, L, D),
            torch.tensor(lens, device="cuda"), rnd(Np * n, Hkv, T, D), rnd(Np * n, Hkv, T, D),
            torch.tensor([slot], device="cuda")]
    out = kernel(*args)
    ref = prefix_attention(*(a.double() if a.is_floating_point() else a for a in args))
    assert out.shape == args[0].shape and rel_err(out, ref) < 1e-2


def test_many_prompts_compiled_matches_eager():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(ModelArgs.from_name("tiny-gqa")).eval()
    prompts = [torch.randint(0, 512, (m,)).tolist() for m in (30, 5, 61)]
    prefix = torch.randint(0, 512, (40,)).tolist()
    runs = [[g.tokens for g in generate_many(model, prompts, prefix, num_samples=4, max_new_tokens=16,
                                             temperature=0.0, compile=c)] for c in (False, True)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kind", ["bf16", "int8"])  # int8 splits K: the add where the splits are summed
@pytest.mark.parametrize("M", [1, 32, 65])  # 65: above the kernel's rows, cuBLAS + add
@pytest.mark.parametrize("N,K", [(4096, 4096), (4096, 11008), (136, 96)])
def test_linear_kernel_residual(kind, M, N, K):
    # the residual add in the kernel's epilogue
    linear = pytest.importorskip("linear_triton").linear
    g = torch.Generator("cuda").manual_seed(M + N)
    x = torch.randn(M, K, generator=g, device="cuda").to(torch.bfloat16)  # (M, K)
    w = torch.randn(N, K, generator=g, device="cuda") * 0.02  # (N, K)
    w, s = (w.to(torch.bfloat16), None) if kind == "bf16" else quantize.quantize_int8(w)
    ref = x.double() @ (w.double() if s is None else quantize.dequantize_int8(w, s).double()).t()  # (M, N)
    res = torch.randn(M, N, generator=g, device="cuda").to(torch.bfloat16)  # (M, N)
    out = linear(x[None], w, s, residual=res[None])  # leading dims kept
    assert out.shape == (1, M, N) and rel_err(out[0], ref + res.double()) < 1e-2


def test_layers_on_triton_match_cublas():
    # checkpoint.load_model puts the bf16 layers on the Triton kernel, the residual adds inside
    linear_triton = pytest.importorskip("linear_triton")
    cfg = dataclasses.replace(ModelArgs.from_name("tiny-gqa"), n_layer=2, dim=4096, n_head=32, n_kv_heads=8,
                              head_dim=128, vocab_size=8192, intermediate_size=4096)  # every layer >= NARROW outputs
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(cfg).to(torch.bfloat16).eval()
    model.setup(16)
    idx, pos = torch.randint(0, cfg.vocab_size, (4, 16), device="cuda"), torch.arange(16, device="cuda")
    with torch.no_grad():
        ref = model(idx, pos)  # cuBLAS, plain norms and adds
        linear_triton.use_kernels(model)
        block = model.layers[0]
        for layer in (model.output, block.attention.wqkv, block.attention.wo, block.feed_forward.w13,
                      block.feed_forward.w2):
            assert isinstance(layer, linear_triton.TritonLinear)
        assert block.feed_forward.w13.swiglu  # the activation in the kernel's epilogue
        assert block.attention.wo.adds_residual and block.feed_forward.w2.adds_residual
        assert rel_err(model(idx, pos), ref) < 1e-2  # 64 rows: the Triton kernel
        assert rel_err(model(idx[:, :1], pos[:1])[:, 0], ref[:, 0]) < 1e-2  # 4 rows


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_layers_take_epilogues(mode, monkeypatch):
    # use_kernels gives quantize.py's w13 the activation and wo and w2 the residual add; the model
    # with them, on the Triton kernel (and PyTorch's int4 kernel for few rows), matches the same weights
    # dequantized through cuBLAS
    linear_triton = pytest.importorskip("linear_triton")
    cfg = dataclasses.replace(ModelArgs.from_name("tiny-gqa"), n_layer=2, dim=1024, n_head=8, n_kv_heads=2,
                              head_dim=128, vocab_size=4096, intermediate_size=2048)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = quantize.quantize_model(Transformer(cfg).to(torch.bfloat16), mode).eval()
    model.setup(16)
    idx, pos = torch.randint(0, cfg.vocab_size, (4, 16), device="cuda"), torch.arange(16, device="cuda")
    with torch.no_grad():
        with monkeypatch.context() as m:
            m.setattr(quantize, "triton_linear", None)  # the plain paths: weights dequantized, cuBLAS
            ref = model(idx, pos)
        linear_triton.use_kernels(model)
        ff, attn = model.layers[0].feed_forward, model.layers[0].attention
        assert ff.w13.swiglu and ff.w2.adds_residual and attn.wo.adds_residual and not attn.wqkv.adds_residual
        assert getattr(ff.w13, "pairs_out", False) == (mode == "int4")  # at one row: w2's x pairs from w13
        assert rel_err(model(idx, pos), ref) < 1e-2  # 64 rows
        assert rel_err(model(idx[:, :1], pos[:1])[:, 0], ref[:, 0]) < 1e-2  # 4 rows
        compiled = torch.compile(model, fullgraph=True, dynamic=False)  # the kernel's arguments in Inductor's code
        assert rel_err(compiled(idx[:, :1], pos[:1])[:, 0], ref[:, 0]) < 1e-2
        if mode == "int8":  # 32 rows (4 x 8 tokens) with wqkv and w13 counted as wide: their x in int8 digits,
            with monkeypatch.context() as m:  # eager and compiled (Inductor making the digits)
                m.setattr(linear_triton, "WIDE", 1536)
                assert linear_triton.default_tiles("int8", 1536, 32).digits
                assert rel_err(model(idx[:, :8], pos[:8]), ref[:, :8]) < 1e-2
                assert rel_err(compiled(idx[:, :8], pos[:8]), ref[:, :8]) < 1e-2
        # one row: int4's GEMV, x's fp16 pairs made by Inductor (w2's by w13's epilogue); compiled and eager
        monkeypatch.setattr(linear_triton, "GEMV_ROWS", 1)
        assert rel_err(compiled(idx[:1, :1], pos[:1])[:, 0], ref[:1, 0]) < 1e-2
        assert rel_err(model(idx[:1, :1], pos[:1])[:, 0], ref[:1, 0]) < 1e-2
        for module in model.modules():  # int4: 4 rows on PyTorch's kernel, the residual added after it
            if hasattr(module, "pack_for_cuda"):
                module.pack_for_cuda()
        assert rel_err(model(idx[:, :1], pos[:1])[:, 0], ref[:, 0]) < 1e-2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("compile", ["--compile", "--no-compile"])
def test_tp_on_two_gpus_equals_one(compile, tmp_path):
    # the CLI under torchrun with NCCL, the decode step compiled and recorded as a CUDA graph with its
    # all-reduces in it (or eager), against one GPU: the shipped model, greedy (its logits are peaked
    # enough that bf16 rounding in another order does not flip a token), then sampling runs too
    from test_tp import ROOT, torchrun
    args = ["--prompt", "def fibonacci(n):", "--num_samples", "4", "--max_new_tokens", "48", "--device", "cuda",
            "--temperature", "0", compile]
    one = subprocess.run([sys.executable, "generate.py", *args, "--output", str(tmp_path / "one.jsonl")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, "generate.py", *args, "--output", str(tmp_path / "two.jsonl"))
    assert two.returncode == 0, two.stderr[-3000:]
    read = lambda f: [json.loads(line)["tokens"] for line in (tmp_path / f).read_text().splitlines()]
    assert read("one.jsonl") == read("two.jsonl")
    sampled = torchrun(2, "generate.py", *args[:-3], "--temperature", "0.8", "--seed", "1", compile)
    assert sampled.returncode == 0 and "x 2 ranks" in sampled.stdout, sampled.stderr[-3000:]
