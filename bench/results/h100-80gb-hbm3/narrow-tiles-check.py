# run_linear on the candidate narrow tiles against the dequantized product, with the residual, 32 rows
import sys; sys.path.insert(0, "scripts"); sys.path.insert(0, ".")
import torch, ab_step, linear_triton as lt
dev = "cuda" if torch.cuda.is_available() else "cpu"
dt = torch.bfloat16 if dev == "cuda" else torch.float32
torch.manual_seed(0)
for name, (w, layer, t) in ab_step.LAYER_TILES.items():
    for K in ((4096, 11008) if layer == "narrow" else (4096,)) if dev == "cuda" else (512,):
        N = (4096 if layer == "narrow" else 12288) if dev == "cuda" else 256
        x = torch.randn(32, K, device=dev, dtype=dt); r = torch.randn(32, N, device=dev, dtype=dt)
        W = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
        if w == "int8":
            s = W.float().abs().amax(1) / 127; q = (W.float() / s[:, None]).round().to(torch.int8)
            ref = r.float() + x.float() @ (q.float() * s[:, None]).T; s = s.to(dt)
            y = lt.run_linear(x, q, s, t, residual=r)
        else:
            ref = r.float() + x.float() @ W.float().T
            y = lt.run_linear(x, W, None, t, residual=r)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        print(name, K, f"{err:.2e}", "OK" if err < 1e-2 else "FAIL")
