# wqkv of Llama-2-7B alone (CUDA graphs, weights far beyond L2): the product, then rope_store (the old path),
# against the product with RoPE and the store in its epilogue (rope-in-qkv-alone.txt, H100):
#   python bench/results/h100-80gb-hbm3/rope-in-qkv-alone.py
# The run of rope-in-qkv-alone.txt also timed the cos and sin loaded in the epilogue, 'fused(late)', through a switch
# the kernel had then (ROPE_EARLY; dropped: no faster); this script times the kept order, loads before the K loop.
import sys, torch, triton
sys.path.insert(0, ".")
import linear_triton as lt, quantize, bifurcated_triton as bt
from model import precompute_freqs_cis
torch.manual_seed(0)
dev = "cuda"
H, Hkv, D, K, T = 32, 32, 128, 4096, 128
N = (H + 2 * Hkv) * D
w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
q8, s8 = quantize.quantize_int8(w)
freqs = precompute_freqs_cis(9000, D, 10000.0, None, dev)[8200:8201]  # (1, D/2, 2)
slot = torch.tensor([8200], device=dev)
def t(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=300) * 1000
for M in (1, 32, 64):
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    kd = torch.zeros(M, Hkv, T, D, device=dev, dtype=torch.bfloat16); vd = torch.zeros_like(kd)
    for name, weight, scales in (("bf16", w, None), ("int8", q8, s8)):
        def apart():
            y = lt.run_linear(x, weight, scales)
            q, k, v = y.view(M, 1, -1, D).split([H, Hkv, Hkv], dim=2)
            return bt.rope_store(q, k, v, freqs[:, None], kd, vd, slot, 8192)
        def prod():
            return lt.run_linear(x, weight, scales)
        def fused():
            return lt.run_linear(x, weight, scales, rope=(freqs.reshape(-1, D), kd, vd, slot, 8192))
        row = [f"{name} M={M}: product {t(prod):.1f} us, product+rope_store {t(apart):.1f}"]
        try:
            row.append(f"fused(early) {t(fused):.1f}")
            ref = apart(); kd1 = kd.clone(); out = fused()
            row.append(f"max|q diff| {(out.view_as(ref) - ref).abs().max().item():.3g} k same {torch.equal(kd1, kd)}")
        except ValueError as e:
            row.append(f"no fused path: {str(e)[:80]}")
        print(", ".join(row), flush=True)
