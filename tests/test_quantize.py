# Weight-only int8 / int4 quantization on small random models, CPU: the error bounds of the math,
# the int4 packing and zero-point convention of torch's int4 kernels (checked against torch's own
# CPU kernel), logits against the unquantized model, the CLI end to end (quantize.py, then
# generate.py on its output), its errors, and file sizes. The GPU kernel path is checked where a
# GPU is present.
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import quantize
from checkpoint import CHECKPOINT_FILE, load_model
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
# every input dimension (256, 768) divisible by every group size; the linear layers hold ~95% of
# the weights, as in a real model, so the file sizes show the quantization
CONFIG = ModelArgs(dim=256, intermediate_size=768, n_layer=4, n_head=4, n_kv_heads=2, vocab_size=256, block_size=256)


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *expected: str):
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def save_checkpoint(dirpath: Path, model: Transformer) -> Path:
    # the original in bf16, as converted checkpoints usually are
    dirpath.mkdir()
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, dirpath / CHECKPOINT_FILE, metadata={"format": "pt", "config": model.config.to_json()})
    return dirpath


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("q") / "model", Transformer(CONFIG))


@pytest.fixture(scope="module")
def cli_files(ckpt) -> dict[str, Path]:
    # the CLI as a user runs it, once per mode (int4 with its default group size)
    files = {}
    for mode, name in [("int8", "converted.int8.safetensors"), ("int4", "converted.int4-g128.safetensors")]:
        proc = run("quantize.py", f"--checkpoint_path={ckpt}", f"--mode={mode}")
        assert proc.returncode == 0 and not proc.stderr, proc.stderr
        assert f"wrote {ckpt / name}" in proc.stdout and "MB ->" in proc.stdout
        files[mode] = ckpt / name
    return files


def logits(model: Transformer) -> torch.Tensor:
    idx = torch.randint(0, CONFIG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    model.setup(24)
    with torch.no_grad():
        return model(idx, torch.arange(24))  # (2, 24, V)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def weights(seed: int, N: int = 64, K: int = 512) -> torch.Tensor:
    # random rows of different magnitudes and offsets, an outlier, and a row of zeros
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) + 0.1 * torch.randn(N, 1, generator=g)
    w[3, 7] = 25.0
    w[5] = 0.0
    return w


# ---------------------------------------------------------------------------------------------
# The math
def test_int8_error_at_most_half_a_step():
    w = weights(0)
    q, scales = quantize.quantize_int8(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (64,)
    err = (quantize.dequantize_int8(q, scales) - w).abs().amax(dim=1)  # (N,)
    assert (err <= scales.float() / 2).all()
    assert q.abs().amax() == 127  # the range is used


@pytest.mark.parametrize("groupsize", quantize.GROUPSIZES)
def test_int4_error_at_most_half_a_step_per_group(groupsize):
    w = weights(1)
    N, K = w.shape
    packed, sz = quantize.quantize_int4(w, groupsize)
    assert packed.shape == (N, K // 2) and packed.dtype == torch.uint8
    assert sz.shape == (K // groupsize, N, 2) and sz.dtype == torch.bfloat16
    err = (quantize.dequantize_int4(packed, sz, groupsize) - w).abs()  # (N, K)
    err = err.view(N, K // groupsize, groupsize).amax(dim=-1)  # (N, K/G)
    # the grid is stored in bf16; its offset may round by ~2^-9 of the zero point
    bound = sz[..., 0].float().t() / 2 + sz[..., 1].float().t().abs() * 2**-8  # (N, K/G)
    assert (err <= bound).all()
    q = quantize.unpack_int4(packed)
    assert q.min() == 0 and q.max() == 15  # the range is used


def test_pack_round_trip_and_byte_layout():
    q = torch.randint(0, 16, (24, 96), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    packed = quantize.pack_int4(q)
    assert packed.shape == (24, 48) and packed.dtype == torch.uint8
    assert torch.equal(quantize.unpack_int4(packed), q)
    # input channel 2i in the high nibble, 2i+1 in the low one (int4mm.cu's uint8 input order)
    assert torch.equal(packed.long(), q[:, 0::2].long() * 16 + q[:, 1::2].long())


def test_int4_dequantize_is_the_kernel_formula():
    # torch's int4 kernels (int4mm.cu): the 4-bit value as a signed int in [-8, 7], then
    # w = value * scale + zero, with scale and zero of group k // G stored at [k // G, n]
    g = torch.Generator().manual_seed(3)
    N, K, G = 8, 64, 32
    packed = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8)
    sz = torch.randn(K // G, N, 2, generator=g).to(torch.bfloat16)
    got = quantize.dequantize_int4(packed, sz, G)
    for n in range(N):
        for k in range(K):
            byte = int(packed[n, k // 2])
            value = (byte >> 4 if k % 2 == 0 else byte & 15) - 8
            scale, zero = float(sz[k // G, n, 0]), float(sz[k // G, n, 1])
            assert got[n, k].item() == pytest.approx(value * scale + zero, rel=1e-6, abs=1e-6)


@pytest.mark.skipif(not hasattr(torch, "_weight_int4pack_mm_for_cpu"), reason="no int4 CPU kernel in this torch")
@pytest.mark.parametrize("groupsize", [32, 128])
def test_int4_plain_path_equals_torch_cpu_kernel(groupsize):
    # torch's CPU int4 kernel shares the CUDA kernel's convention: the same checkpoint tensors
    # must give the same products through it and through the plain dequantize path
    w = weights(4, N=64, K=256)
    packed, sz = quantize.quantize_int4(w, groupsize)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(5))
    layer = quantize.Int4Linear(256, 64, groupsize)
    layer.load_state_dict({"weight": packed, "scales_and_zeros": sz.float()})
    plain = layer(x)  # (5, N)
    kernel_weight = torch._convert_weight_to_int4pack_for_cpu(quantize.unpack_int4(packed).int(), 2)
    kernel = torch._weight_int4pack_mm_for_cpu(x, kernel_weight, groupsize, sz.float())  # (5, N)
    torch.testing.assert_close(plain, kernel, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Swapping and loading
@pytest.mark.parametrize("mode,groupsize", [("int8", None), ("int4", 64)])
def test_swap_on_meta_matches_quantized_state(mode, groupsize):
    torch.manual_seed(0)
    plain = Transformer(CONFIG)
    state = quantize.quantize_state_dict(plain, mode, groupsize)
    with torch.device("meta"):
        model = quantize.swap_linears(Transformer(CONFIG), mode, groupsize)
    assert {k: t.shape for k, t in model.state_dict().items()} == {k: t.shape for k, t in state.items()}
    for k, t in model.state_dict().items():
        assert t.is_meta
        # integer weights as stored; scales bf16 in the file, in the model dtype once loaded
        assert t.dtype == state[k].dtype or (t.is_floating_point() and state[k].dtype == torch.bfloat16)
    kind = quantize.Int8Linear if mode == "int8" else quantize.Int4Linear
    assert sum(isinstance(m, kind) for m in model.modules()) == 4 * CONFIG.n_layer  # wqkv, wo, w13, w2
    assert isinstance(model.output, torch.nn.Linear) and isinstance(model.tok_embeddings, torch.nn.Embedding)


@pytest.mark.parametrize("mode,groupsize,bound", [("int8", None, 0.02), ("int4", 32, 0.10)])
def test_logits_close_to_unquantized(ckpt, tmp_path, mode, groupsize, bound):
    plain, _ = load_model(str(ckpt))
    path = quantize.main(str(shutil.copytree(ckpt, tmp_path / "model")), mode, groupsize)
    model, _ = load_model(str(path))
    wqkv = model.layers[0].attention.wqkv
    assert wqkv.weight.dtype == (torch.int8 if mode == "int8" else torch.uint8)  # not cast to the model dtype
    assert (wqkv.scales if mode == "int8" else wqkv.scales_and_zeros).dtype == torch.float32
    ref, out = logits(plain), logits(model)
    assert 0 < rel_err(out, ref) < bound


@pytest.mark.parametrize("mode,groupsize", [("int8", None), ("int4", 32)])
def test_gate_up_layer_with_the_activation_inside(mode, groupsize):
    # on CUDA the MLP's w13 returns silu(gate) * up from its kernel (linear_triton); the plain path
    # of the flag gives the same logits as the activation applied by the model
    torch.manual_seed(0)
    plain = Transformer(CONFIG)
    with torch.device("meta"):
        model = quantize.swap_linears(Transformer(CONFIG), mode, groupsize)
    model.load_state_dict(quantize.quantize_state_dict(plain, mode, groupsize), assign=True)
    ref = logits(model)
    for layer in model.layers:
        layer.feed_forward.w13.swiglu = True
    torch.testing.assert_close(logits(model), ref)


def test_renamed_file_loads_by_metadata(cli_files, tmp_path):
    renamed = tmp_path / "plain_name.safetensors"
    shutil.copy(cli_files["int4"], renamed)
    model, _ = load_model(str(renamed))
    assert isinstance(model.layers[0].feed_forward.w2, quantize.Int4Linear)
    assert model.layers[0].feed_forward.w2.groupsize == 128
    same, _ = load_model(str(cli_files["int4"]))
    assert torch.equal(logits(model), logits(same))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_file_with_separate_w1_w3_loads(cli_files, tmp_path, mode):
    # files written before the gate and up projections were fused into w13 still load, the same model
    with safe_open(str(cli_files[mode]), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for name in [k for k in state if ".feed_forward.w13." in k]:
        dim = 1 if name.endswith("scales_and_zeros") else 0
        state[name.replace(".w13.", ".w1.")], state[name.replace(".w13.", ".w3.")] = state.pop(name).chunk(2, dim)
    save_file({k: t.contiguous() for k, t in state.items()}, str(tmp_path / "old.safetensors"), metadata=meta)
    old, _ = load_model(str(tmp_path / "old.safetensors"))
    same, _ = load_model(str(cli_files[mode]))
    assert torch.equal(logits(old), logits(same))


def test_metadata_and_sizes(ckpt, cli_files):
    original = (ckpt / CHECKPOINT_FILE).stat().st_size
    with safe_open(str(ckpt / CHECKPOINT_FILE), framework="pt") as f:
        config = f.metadata()["config"]
    for mode, spec, limit in [("int8", {"mode": "int8"}, 0.55), ("int4", {"mode": "int4", "groupsize": 128}, 0.35)]:
        with safe_open(str(cli_files[mode]), framework="pt") as f:
            meta = f.metadata()
        assert meta["config"] == config and json.loads(meta["quantization"]) == spec
        assert cli_files[mode].stat().st_size <= limit * original
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generate_from_quantized_checkpoint(cli_files, mode):
    proc = run("generate.py", f"--checkpoint_path={cli_files[mode]}", "--prompt_len=8", "--num_samples=2",
               "--max_new_tokens=4", "--device=cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- sample") == 2 and "--- stats ---" in proc.stdout


# ---------------------------------------------------------------------------------------------
# Errors
@pytest.fixture(scope="module")
def narrow_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("narrow") / "model", Transformer(ModelArgs.from_name("tiny-gqa")))


BAD_INPUTS = {
    # case: (arguments, substrings of the error line)
    "unknown_mode": (["--checkpoint_path={ckpt}", "--mode=int3"], ["'int3'", "int8, int4"]),
    "groupsize_not_supported": (["--checkpoint_path={ckpt}", "--mode=int4", "--groupsize=48"], ["32, 64, 128, 256", "48"]),
    "groupsize_does_not_divide": (["--checkpoint_path={narrow}", "--mode=int4", "--groupsize=128"],
                                  ["groupsize 128", "input dimension 64", "layers.0.attention.w"]),
    "groupsize_with_int8": (["--checkpoint_path={ckpt}", "--mode=int8", "--groupsize=64"], ["int4 only"]),
    "already_quantized": (["--checkpoint_path={int8}", "--mode=int4"], ["already quantized", "int8"]),
    "missing_checkpoint": (["--checkpoint_path={ckpt}/nowhere", "--mode=int8"], ["checkpoint not found"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_error(case, ckpt, narrow_ckpt, cli_files):
    args, expected = BAD_INPUTS[case]
    before = sorted(p.name for p in ckpt.iterdir())
    paths = dict(ckpt=ckpt, narrow=narrow_ckpt, int8=cli_files["int8"])
    assert_one_line_error(run("quantize.py", *[a.format(**paths) for a in args]), *expected)
    assert sorted(p.name for p in ckpt.iterdir()) == before  # nothing written
    assert [p.name for p in narrow_ckpt.iterdir()] == [CHECKPOINT_FILE]


# ---------------------------------------------------------------------------------------------
# GPU: the int4 layer's kernels (PyTorch's for a few rows, Triton's for decode rows, dequantize + cuBLAS
# for prefill rows) == the plain path
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("groupsize", quantize.GROUPSIZES)
@pytest.mark.parametrize("K", [96, 320, 768, 11008])
@pytest.mark.parametrize("rows", [1, 7, 100])  # PyTorch's int4 kernel; the Triton decode kernel; the prefill path
def test_int4_cuda_kernel_equals_plain_path(groupsize, K, rows):
    if K % groupsize:
        pytest.skip("groupsize does not divide K")
    w = weights(6, N=136, K=K)
    packed, sz = quantize.quantize_int4(w, groupsize)
    x = torch.randn(3, rows, K, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    ref = x.float() @ quantize.dequantize_int4(packed, sz, groupsize).t()  # (3, rows, N), fp32
    layer = quantize.Int4Linear(K, 136, groupsize)
    layer.load_state_dict({"weight": packed.cuda(), "scales_and_zeros": sz.cuda()}, assign=True)
    layer.pack_for_cuda()
    assert layer.tinygemm is not None and "tinygemm" not in layer.state_dict()
    out = layer(x.cuda())  # rows = 1: 3 rows in all, up to quantize.TINYGEMM_ROWS
    assert out.shape == (3, rows, 136) and out.dtype == torch.bfloat16
    assert rel_err(out.cpu(), ref) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_cuda_equals_cpu(cli_files, mode):
    cpu, _ = load_model(str(cli_files[mode]))
    gpu, _ = load_model(str(cli_files[mode]), device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    gpu.setup(24)
    with torch.no_grad():
        out = gpu(idx.cuda(), torch.arange(24, device="cuda")).float().cpu()
    assert rel_err(out, logits(cpu)) < 2e-2
