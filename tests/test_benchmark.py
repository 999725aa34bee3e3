# scripts/benchmark.py: the sweep in-process on a tiny model (rows, floor fields, table), the floor
# formula on a hand-computed case, and configurations that do not fit recorded without stopping it.
import json
import sys
from pathlib import Path

import pytest
import torch

import generate
from bifurcated import DoesNotFit
from model import ModelArgs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import benchmark  # noqa: E402

SWEEP = dict(models=["tiny-gqa"], contexts=[64, 100], samples=[1, 3], attention=["bifurcated", "standard"],
             max_new_tokens=8, repeats=1, tag="sweep", device="cpu", dtype="float32", compile=None, e2e=None)
DECODE_KEYS = {"kind", "model", "context", "n", "attention", "weights", "max_new_tokens", "predicted_gb", "oom", "ms_per_step",
               "ms_per_step_runs", "prefill_ms", "peak_memory_gb", "compile_s", "compile_s_runs", "bytes_per_step_gb",
               "tflop_per_step", "floor_ms", "bound", "pct_of_floor", "achieved_gbps"}
PLAN_BYTES = 3e9  # what the stub plan_memory predicts for every configuration


@pytest.fixture
def plan_calls(monkeypatch):
    # the benchmark records what generate.plan_memory predicts, whatever generate's own fit check says
    calls = []

    def plan_memory(config, attention, n, M, T, dtype):
        calls.append((config.n_layer, attention, n, M, T, dtype))
        return dict(weights=1e9, context=1e9, decode=5e8, workspace=5e8, total=PLAN_BYTES)

    monkeypatch.setattr(generate, "plan_memory", plan_memory)
    return calls


def read_results(tmp_path) -> tuple[dict, str]:
    stem = tmp_path / "cpu" / "sweep"
    return json.loads(stem.with_suffix(".json").read_text()), stem.with_suffix(".md").read_text()


def test_sweep_rows_and_table(tmp_path, plan_calls):
    benchmark.main(out_dir=str(tmp_path), **SWEEP)
    result, table = read_results(tmp_path)
    assert result["gpu"] == "cpu" and result["torch"] == torch.__version__ and result["dtype"] == "float32"
    assert result["read_bandwidth_gbps"] > 0 and result["matmul_tflops"] > 0 and result["argv"] and result["date"]
    rows = result["rows"]
    configs = [(M, n, a) for M in (64, 100) for n in (1, 3) for a in ("bifurcated", "standard")]
    assert [(r["context"], r["n"], r["attention"]) for r in rows] == configs  # no e2e row by default on CPU
    assert plan_calls == [(2, a, n, M, 8, torch.float32) for M, n, a in configs]
    for r in rows:
        assert set(r) == DECODE_KEYS and r["kind"] == "decode" and not r["oom"]
        assert r["predicted_gb"] == PLAN_BYTES / 1e9
        for key in ("ms_per_step", "prefill_ms", "peak_memory_gb", "bytes_per_step_gb", "tflop_per_step",
                    "floor_ms", "pct_of_floor", "achieved_gbps"):
            assert r[key] > 0, key
        assert r["pct_of_floor"] == pytest.approx(100 * r["floor_ms"] / r["ms_per_step"])
        assert r["achieved_gbps"] == pytest.approx(r["bytes_per_step_gb"] / r["ms_per_step"] * 1e3)
    # the standard cache reads the context once per sample: more bytes at n = 3, the same at n = 1
    by = {(r["context"], r["n"], r["attention"]): r["bytes_per_step_gb"] for r in rows}
    assert by[100, 3, "standard"] > by[100, 3, "bifurcated"] and by[100, 1, "standard"] == by[100, 1, "bifurcated"]
    table_rows = [line for line in table.splitlines() if line.startswith("| tiny-gqa |")]
    assert len(table_rows) == len(configs)
    assert table_rows[0].startswith("| tiny-gqa | 64 | 1 | bifurcated |")


def test_e2e_row(tmp_path, plan_calls, monkeypatch):
    monkeypatch.setattr(benchmark, "E2E_PROMPT", 48)  # 1024 and 256 on a GPU; small here to keep the test fast
    monkeypatch.setattr(benchmark, "E2E_NEW_TOKENS", 16)
    benchmark.main(out_dir=str(tmp_path), **dict(SWEEP, contexts=[64], samples=[1], attention=["bifurcated"], e2e=True))
    result, table = read_results(tmp_path)
    e2e = result["rows"][0]
    assert e2e["kind"] == "e2e" and (e2e["context"], e2e["n"], e2e["max_new_tokens"]) == (48, 1, 16)
    assert e2e["tokens_per_s"] == pytest.approx(16 / e2e["total_s"]) and e2e["tokens_per_s"] > 0
    assert len(result["rows"]) == 2 and "End to end" in table


def test_quantized_rows_read_fewer_bytes(tmp_path, plan_calls):
    benchmark.main(out_dir=str(tmp_path), **dict(SWEEP, contexts=[64], samples=[3], attention=["bifurcated"],
                                                 weights=["bf16", "int8"]))
    result, table = read_results(tmp_path)
    bf16, int8 = result["rows"]
    assert (bf16["weights"], int8["weights"]) == ("bf16", "int8") and int8["ms_per_step"] > 0
    # fp32 on CPU: the int8 blocks read 1 byte per weight (+ scales) instead of 4
    assert int8["bytes_per_step_gb"] < 0.5 * bf16["bytes_per_step_gb"]
    assert "| tiny-gqa | 64 | 3 | bifurcated | int8 |" in table


def test_weight_bytes_count_one_copy_of_int4():
    # an int4 layer on CUDA also keeps its weight in PyTorch's layout (Int4Linear.tinygemm) and a step
    # reads one of the two; the embedding is not read but for n rows
    import quantize
    from model import Transformer
    config = ModelArgs(dim=64, intermediate_size=128, n_layer=2, n_head=4, n_kv_heads=2, vocab_size=256, block_size=64)
    model = quantize.quantize_model(Transformer(config), "int4", 32)
    layers = [m for m in model.modules() if isinstance(m, quantize.Int4Linear)]
    read = (sum(m.weight.nbytes + m.scales_and_zeros.nbytes for m in layers) + model.output.weight.nbytes
            + sum(p.nbytes for name, p in model.named_parameters() if "norm" in name))
    assert benchmark.weight_bytes(model) == read
    for m in layers:  # as pack_for_cuda leaves it: as many bytes again
        m.tinygemm = torch.empty(m.weight.numel() // 4, dtype=torch.int32)
    assert benchmark.weight_bytes(model) == read


def test_merge_joins_runs(tmp_path, plan_calls):
    for tag, M in [("a", 64), ("b", 100)]:
        benchmark.main(out_dir=str(tmp_path), **dict(SWEEP, contexts=[M], samples=[1], attention=["bifurcated"],
                                                     tag=tag))
    runs = [str(tmp_path / "cpu" / f"{tag}.json") for tag in "ab"]
    benchmark.merge(runs, str(tmp_path), "sweep")
    result, table = read_results(tmp_path)
    assert [r["context"] for r in result["rows"]] == [64, 100] and len(result["sources"]) == 2
    assert "Rows from these runs" in table and table.count("| tiny-gqa |") == 2
    rerun = json.loads(Path(runs[0]).read_text())  # the M = 64 run again, later: its row replaces the first
    rerun["rows"] = [dict(row, ms_per_step=123.0) for row in rerun["rows"]]
    Path(tmp_path / "c.json").write_text(json.dumps(rerun))
    benchmark.merge(runs + [str(tmp_path / "c.json")], str(tmp_path), "sweep")
    result, _ = read_results(tmp_path)
    decode = [r for r in result["rows"] if r["kind"] == "decode"]
    assert [(r["context"], r["ms_per_step"] == 123.0) for r in decode] == [(100, False), (64, True)]
    benchmark.merge([str(tmp_path / "cpu" / "sweep.json")], str(tmp_path), "again")  # a merged file merges again
    again = json.loads((tmp_path / "cpu" / "again.json").read_text())
    assert len(again["sources"]) == 3 and again["rows"] == result["rows"]
    other = json.loads(Path(runs[1]).read_text())
    Path(runs[1]).write_text(json.dumps(dict(other, gpu="NVIDIA H200")))
    with pytest.raises(ValueError, match="more than one GPU"):
        benchmark.merge(runs, str(tmp_path), "sweep")


def test_step_cost_by_hand():
    # tiny-gqa: L=2, H=4, Hkv=2, D=16; fp32; n=3, M=100, T=8
    config = ModelArgs.from_name("tiny-gqa")
    model, _ = generate.load_model("synthetic:tiny-gqa")
    params = 2 * ((4 + 2 * 2) * 16 * 64 + 64 * 64 + 3 * 176 * 64) + 512 * 64  # wqkv, wo, w13 + w2; output
    assert benchmark.linear_params(model) == params == 124928
    kv = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, D 16, 4 bytes: 512 bytes per token
    decode = kv * 3 * 8 / 2  # 3 samples, on average T / 2 = 4 of their own tokens
    flops = 2 * params * 3 + 4 * 2 * 4 * 16 * 3 * (100 + 4)
    bif = benchmark.step_cost(config, params, "bifurcated", 3, 100, 8, 4)
    std = benchmark.step_cost(config, params, "standard", 3, 100, 8, 4)
    assert bif == (params * 4 + kv * 100 + decode, flops) == (499712 + 51200 + 6144, 909312)
    assert std == (params * 4 + 3 * kv * 100 + decode, flops)


def test_does_not_fit_is_recorded_and_the_sweep_goes_on(tmp_path, plan_calls, monkeypatch):
    real = generate.generate

    def fake(model, prompt_ids, num_samples, attention, **kwargs):
        if attention == "standard" and num_samples == 3:
            raise DoesNotFit("does not fit: predicted 3.0 GB, 1.0 GB free")
        if attention == "standard" and len(prompt_ids) == 100:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(model, prompt_ids, num_samples, attention=attention, **kwargs)

    monkeypatch.setattr(generate, "generate", fake)
    benchmark.main(out_dir=str(tmp_path), **SWEEP)
    result, table = read_results(tmp_path)
    rows = {(r["context"], r["n"], r["attention"]): r for r in result["rows"]}
    assert len(rows) == 8
    assert rows[64, 3, "standard"] == dict(kind="decode", model="tiny-gqa", context=64, n=3, attention="standard",
                                           weights="bf16", max_new_tokens=8, predicted_gb=3.0, oom=True)
    assert rows[100, 1, "standard"]["oom"] and rows[100, 1, "standard"]["crashed"]
    assert [k for k, r in rows.items() if r["oom"]] == [(64, 3, "standard"), (100, 1, "standard"), (100, 3, "standard")]
    assert all(r["ms_per_step"] > 0 for r in rows.values() if not r["oom"])
    assert table.count("OOM (predicted 3.0 GB)") == 3


def test_other_errors_are_not_taken_for_oom(tmp_path, plan_calls, monkeypatch):
    def fake(*args, **kwargs):
        raise ValueError("prompt too long")

    monkeypatch.setattr(generate, "generate", fake)
    with pytest.raises(ValueError, match="prompt too long"):
        benchmark.main(out_dir=str(tmp_path), **SWEEP)


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    row = dict(kind="decode", model="tiny-gqa", context=64, oom=False)
    rows = [dict(row, n=n, attention=a, ms_per_step=ms) for n, a, ms in [(1, "bifurcated", 1.0), (8, "bifurcated", 1.5),
                                                                         (1, "standard", 1.0), (8, "standard", 4.0)]]
    rows.append(dict(row, n=64, attention="standard", oom=True, predicted_gb=90.0))  # no point
    path = tmp_path / "sweep.png"
    assert benchmark.plot(path, dict(gpu="cpu", dtype="float32", max_new_tokens=8, rows=rows))
    assert path.read_bytes().startswith(b"\x89PNG")


def test_gpu_slug():
    assert benchmark.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert benchmark.gpu_slug("NVIDIA H200") == "h200"


def test_many_prompt_rows(tmp_path, plan_calls):
    benchmark.main(out_dir=str(tmp_path), **dict(SWEEP, samples=[2], many=[3, 20, 9]))
    result, table = read_results(tmp_path)
    rows = {r["attention"]: r for r in result["rows"]}
    assert list(rows) == ["three-level", "one-level", "standard"]
    three, one = rows["three-level"], rows["one-level"]
    assert (three["prompts"], three["prefix"], three["prompt_tokens"], three["n"]) == (3, 20, 9, 2)
    assert three["ms_per_step"] > 0 and one["ms_per_step"] > 0 and not rows["standard"]["measured"]
    # the prefix stored and read once: 20 + 3 x 9 context tokens instead of 3 x (20 + 9)
    kv = one["bytes_per_step_gb"] - three["bytes_per_step_gb"]
    assert kv == pytest.approx(2 * 20 * (2 * 2 * 2 * 16 * 4) / 1e9)  # 40 tokens of 512 bytes fewer
    assert [c for c in (64, 100) if f"| {c} |" in table] == [] and "Several prompts after a shared prefix" in table
    assert "| model | context |" not in table  # no empty table of one-prompt rows


def test_listed_configs_each_model_built_once(tmp_path, plan_calls, monkeypatch):
    built, load = [], generate.load_model
    monkeypatch.setattr(generate, "load_model", lambda path, *a, **k: built.append(path) or load(path, *a, **k))
    configs = [("tiny-gqa", 64, 1, "bifurcated"), ("tiny-mha", 100, 3, "standard"), ("tiny-gqa", 100, 3, "bifurcated")]
    benchmark.main(out_dir=str(tmp_path), **SWEEP, configs=configs)
    rows = read_results(tmp_path)[0]["rows"]
    assert built == ["synthetic:tiny-gqa", "synthetic:tiny-mha"]
    assert [(r["model"], r["context"], r["n"], r["attention"]) for r in rows] == [configs[0], configs[2], configs[1]]
    with pytest.raises(ValueError, match="--many"):
        benchmark.main(out_dir=str(tmp_path), **dict(SWEEP, many=[3, 20, 9]), configs=configs)


def test_table_is_the_readme_table():
    # --table runs the rows of the README's results table: each (model, context, n) there, bifurcated
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    shown = set()
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0].endswith("K") and cells[1].isdigit():
            model, context = cells[0].split(", ")
            shown.add((model.removesuffix(" (GQA)"), int(context[:-1]) * 1024, int(cells[1])))
    table = {(m, M, n) for m, M, n, mode in benchmark.TABLE if mode == "bifurcated"}
    assert shown and shown == table
    standard = [(m, M, n) for m, M, n, mode in benchmark.TABLE if mode == "standard"]
    assert standard == [("Llama-2-7B", 8192, 8), ("Llama-2-7B", 8192, 32)]


def test_ab_step_variants_and_caches():
    # scripts/ab_step.py: each variant's replacement in place while it runs and the original back after;
    # the compile caches off (their keys miss the replaced functions); rows interleaved by variant
    ab_step = pytest.importorskip("ab_step")  # imports Triton (the kernels' modules)
    import bifurcated_triton as bt
    import linear_triton as lt
    plan, tiles = bt.context_plan, lt.default_tiles
    import torch._functorch.config as aot_config
    import torch._inductor.config as inductor_config
    caches = inductor_config.fx_graph_cache, aot_config.enable_autograd_cache
    with ab_step.caches_off():
        assert not inductor_config.fx_graph_cache and not aot_config.enable_autograd_cache
    assert (inductor_config.fx_graph_cache, aot_config.enable_autograd_cache) == caches
    assert plan(16, 8192, 32, 132)[1] == 8  # 2 waves of 132 SMs over 32 KV heads
    assert ab_step.with_variant("context-1-wave", lambda: bt.context_plan(16, 8192, 32, 132))[1] == 4
    assert ab_step.with_variant("context-4-waves", lambda: bt.context_plan(16, 8192, 32, 132))[1] == 16
    # GQA n = 32 (128 rows a KV head): two 64-row blocks in 2 waves, or one 128-row block in one wave
    assert bt.context_plan(128, 8192, 8, 132) == (64, 16, 512)
    assert ab_step.with_variant("context-wide-128", lambda: bt.context_plan(128, 8192, 8, 132)) == (128, 16, 512)
    assert tiles("int8", 12288, 32).digits and not tiles("int8", 4096, 32).digits and tiles("int8", 12288, 1).f16
    assert ab_step.with_variant("int8-x-fp16", lambda: lt.default_tiles("int8", 12288, 32)).f16
    assert ab_step.with_variant("int8-digits-all", lambda: lt.default_tiles("int8", 4096, 32)).digits
    assert not ab_step.with_variant("int8-bf16", lambda: lt.default_tiles("int8", 12288, 32)).f16
    assert ab_step.with_variant("int8-f16-all", lambda: lt.default_tiles("int8", 4096, 32)).f16
    assert ab_step.with_variant("int8-f16-all", lambda: lt.default_tiles("bf16", 4096, 32)) == tiles("bf16", 4096, 32)
    # 32 rows on an H100 (16-row tiles): Llama-2-7B's bf16 w2 in 2 splits of K, not wo or Mistral-7B's w2; the
    # variants that give back the tiles before, and int8's wqkv digits on K tiles of 256 (w13's stay 128)
    h100 = lambda N, K, kind="bf16", swiglu=False: lt.default_tiles(kind, N, 32, 132, False, swiglu, K)
    assert h100(4096, 11008).splits == 2 and h100(4096, 4096).splits == h100(4096, 14336).splits == 1
    assert ab_step.with_variant("bf16-narrow-before", lambda: h100(4096, 11008)) == h100(4096, 4096)
    assert h100(12288, 4096, "int8").block_k == 256 and h100(22016, 4096, "int8", True).block_k == 128
    assert ab_step.with_variant("int8-wqkv-before", lambda: h100(12288, 4096, "int8")).block_k == 128
    assert ab_step.with_variant("bf16-wo-64-s2", lambda: h100(4096, 4096)).splits == 2
    assert ab_step.with_variant("bf16-wo-64-s2", lambda: h100(4096, 11008)) == h100(4096, 11008)
    assert ab_step.with_variant("bf16-w2-64-s2", lambda: h100(4096, 14336)).splits == 2
    gemv = lambda: lt.default_tiles("int4", 12288, 1).gemv  # int4's one row: Triton's GEMV, or PyTorch's kernel
    assert ab_step.with_variant("int4-gemv", gemv) and not ab_step.with_variant("int4-tinygemm", gemv)
    run_gemv, rows = lt.run_gemv, lt.GEMV_ROWS  # the one-row kernel without w13's pairs for w2: run_gemv
    # drops its last argument
    assert ab_step.with_variant("int4-gemv-no-pairs", lambda: gemv() and lt.run_gemv is not run_gemv)
    assert lt.run_gemv is run_gemv and lt.GEMV_ROWS == rows
    int4 = lambda N: lt.default_tiles("int4", N, 32)  # 32 rows: wide layers with x reordered, narrow ones not
    assert int4(12288).xperm and not int4(4096).xperm
    assert not ab_step.with_variant("int4-tiles-before", lambda: int4(12288)).xperm
    assert ab_step.with_variant("int4-narrow-128", lambda: int4(4096)).block_n == 128
    # MHA n = 32 at 32K (32 rows a KV head): one wave of 4 splits, 128 keys a step; the variants' 2 waves
    k = torch.empty(32, 32768, 128, device="meta")
    level = lambda: bt.context_level(32, k, k, 132, bt.Tiles())
    assert (level()[0].block_n, level()[1].plan) == (128, (32, 4, 8192))
    assert ab_step.with_variant("attention-2-waves", lambda: level()[1].plan) == (32, 8, 4096)
    assert ab_step.with_variant("attention-2-waves-128", lambda: level()[0].block_n) == 128
    assert ab_step.with_variant("attention-1-wave-64", lambda: (level()[0].block_n, level()[1].plan)) == (
        64, (32, 4, 8192))
    assert ab_step.with_variant("context-no-cudnn", lambda: bt.cudnn_context) is not bt.cudnn_context
    # the TMA on bf16 and int8 tiles (not int4's), wide layers only with tma-wide; and on the attention's
    assert ab_step.with_variant("tma", lambda: lt.default_tiles("int8", 4096, 32).tma)
    assert not ab_step.with_variant("tma", lambda: lt.default_tiles("int4", 4096, 32).tma)
    assert not ab_step.with_variant("tma-wide", lambda: lt.default_tiles("bf16", 4096, 32).tma)
    assert ab_step.with_variant("tma-attention", lambda: level()[0].tma) and not level()[0].tma
    # wo and w2 on the Triton kernel up to 256 rows: MAX_M raised and run_linear wrapped while it runs
    run_linear, max_m = lt.run_linear, lt.MAX_M
    assert ab_step.with_variant("narrow-rows-64-s2", lambda: (lt.MAX_M, lt.run_linear is not run_linear)) == (256, True)
    assert lt.run_linear is run_linear and lt.MAX_M == max_m == 64
    # which layers the Triton kernel takes at 65 to 256 rows: the narrow ones, or with rows-all-128 every bf16 one
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lt, "run_linear", lambda x, w, s, t=None, *a: calls.append(("triton", w.shape[0], t and t.block_n)))
        mp.setattr(lt, "dense_linear", lambda x, w, *a, eager: calls.append(("cublas", w.shape[0])))
        layers = lambda: [lt.run_linear(torch.empty(m, 8), torch.empty(n, 8), None) for m in (64, 128, 257)
                          for n in (4096, lt.WIDE)]
        ab_step.with_variant("narrow-rows-64-s2", layers)
        ab_step.with_variant("rows-all-128", layers)
    assert calls[2:4] == [("triton", 4096, 64), ("cublas", lt.WIDE)]
    assert calls[8:10] == [("triton", 4096, 128), ("triton", lt.WIDE, 128)]
    assert calls[:2] == calls[4:6] == [("triton", 4096, None), ("triton", lt.WIDE, None)]  # the step's own
    assert ab_step.with_variant("side-256", lambda: bt.SIDE_ROWS) == 256 and bt.SIDE_ROWS == 512
    assert bt.context_plan is plan and lt.default_tiles is tiles
    rows = ab_step.main(["main", "context-1-wave"], "tiny-gqa", [64], [2], "bf16", False, 2, 4, "cpu", "float32",
                        None)
    assert [(r["variant"], r["rep"], r["n"], r["context"]) for r in rows] == [
        ("main", 0, 2, 64), ("context-1-wave", 0, 2, 64), ("main", 1, 2, 64), ("context-1-wave", 1, 2, 64)]
    assert all(r["ms_per_step"] > 0 for r in rows)


def test_ab_step_a_failing_variant_is_a_row(monkeypatch, capsys):
    # a variant whose code fails (as a first GPU run may) is recorded with its error; the others still run
    import ab_step

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")
    monkeypatch.setitem(ab_step.VARIANTS, "broken", lambda: (ab_step.benchmark, "step_cost", broken))
    rows = ab_step.main(["broken", "main"], "tiny-gqa", [64], [2], "bf16", False, 1, 4, "cpu", "float32", None)
    assert [r["variant"] for r in rows] == ["broken", "main"]
    assert rows[0]["error"] == "RuntimeError: no kernel" and rows[0]["config"] == (64, 2)
    assert rows[1]["ms_per_step"] > 0 and "error" not in rows[1]
    assert "bf16 broken (64, 2): failed: RuntimeError: no kernel" in capsys.readouterr().out
