# Run from the repository root as `python bench/results/h100-80gb-hbm3/int8-digits-sweep.py` (output:
# int8-digits-sweep.json, int8-digits-best-ab.json; see int8-digits.md). `main` in its A/B was the code then: x in
# digits on the x-in-fp16 tiles; `int8-x-fp16` there restored x in fp16 on the same tiles (the main of before).
# Its per-layer baseline (`main`) is not x in fp16: from that default with `digits` off, it is x in bf16 and the
# weight converted by Triton (from today's default, the same path on the new tiles)
# int8 layers at 32 rows with x in digits: the kernel alone (digits made beforehand) on a sweep of tiles, against
# main's tiles without digits (see above); then whole steps with the best digits tiles per layer
import sys, os, json, itertools, dataclasses
sys.path.insert(0, "scripts"); sys.path.insert(0, ".")
import torch, triton, triton.testing
import linear_triton as lt
from bench_attention import read_bandwidth
OUT = os.environ.get("OUT", ".")
bw = read_bandwidth()
print(f"read {bw / 1e9:.0f} GB/s", flush=True)
M = 32
SHAPES = {"wqkv": (12288, 4096, False), "w13": (22016, 4096, True), "wo": (4096, 4096, False),
          "w2": (4096, 11008, False)}
WIDE = [(32, 256, 2, None, 3, 4), (32, 256, 2, None, 4, 4), (32, 256, 1, None, 4, 4), (32, 128, 2, None, 5, 4),
        (64, 128, 1, None, 4, 4), (64, 128, 1, None, 6, 4), (64, 256, 1, None, 4, 4), (64, 256, 1, None, 3, 8),
        (64, 128, 2, None, 4, 4), (64, 256, 2, None, 3, 4), (128, 128, 1, None, 3, 8), (128, 128, 1, None, 4, 8),
        (128, 64, 1, None, 6, 8), (128, 256, 1, None, 3, 8), (128, 128, 1, None, 4, 4)]
NARROW = [(32, 128, 3, None, 4, 4), (32, 128, None, 1, 8, 4), (32, 256, None, 1, 6, 4), (32, 256, None, 1, 4, 8),
          (16, 256, None, 1, 6, 4), (64, 128, None, 1, 4, 4), (64, 256, None, 1, 4, 4), (64, 128, 2, None, 4, 4)]
res, best = [], {}
for name, (N, K, sw) in SHAPES.items():
    copies = max(2, (200 << 20) // (N * K) + 1)
    qs = [torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8) for _ in range(copies)]
    ss = [(torch.rand(N, device="cuda") * 1e-3).to(torch.bfloat16) for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    ref = None if sw else x.float() @ (qs[0].float() * ss[0].float()[:, None]).t()
    digits = lt.int8_digits(x)
    base = dataclasses.replace(lt.default_tiles("int8", N, M, swiglu=sw), digits=False)
    x16 = (x * 2.0 ** -lt.X_SHIFT).to(torch.float16)
    cands = [("main", base, x16 if base.f16 else x)]
    for n, k, w, p, s, nw in (WIDE if N >= lt.WIDE else NARROW):
        t = lt.Tiles(block_n=n, block_k=k, waves=w or 1, splits=p, stages=s, warps=nw, digits=True)
        cands.append(("digits", t, x))
    orig = lt.int8_digits
    lt.int8_digits = lambda _x: digits  # made beforehand: the kernel alone
    for path, t, xin in cands:
        try:
            fn = lambda q, s: lt.run_linear(xin, q, s, tiles=t, swiglu=sw)
            y = fn(qs[0], ss[0]).float()
            if ref is not None and not sw and path == "digits":
                err = ((y - ref).norm() / ref.norm()).item()
                assert err < 1e-2, err
            it = itertools.cycle(list(zip(qs, ss)))
            us = 1e3 * triton.testing.do_bench_cudagraph(lambda: fn(*next(it)), return_mode="median")
        except Exception as e:
            print(f"{name} {path} {t}: {type(e).__name__} {str(e)[:100]}", flush=True)
            continue
        pct = N * K / (us * 1e-6) / bw * 100
        print(f"{name} M={M} {path} {t} {us:.1f} us {pct:.0f}%", flush=True)
        res.append(dict(layer=name, path=path, tiles=str(t), us=us, pct=pct))
        if path == "digits" and (name not in best or us < best[name][1]):
            best[name] = (t, us)
        if path == "main":
            best[name + "-main"] = (t, us)
    lt.int8_digits = orig
    del qs, ss
    torch.cuda.empty_cache()
for k, v in best.items():
    print("best", k, v, flush=True)
json.dump(dict(read_gbps=bw / 1e9, rows=res), open(f"{OUT}/digits_sweep.json", "w"), indent=1)
# whole steps: main's x-in-fp16 tiles; digits on the best tiles for wqkv and w13; and for all four
import ab_step
tiles0 = lt.default_tiles
def pick(kind, N, M=1, n_sm=132, row_tiles=True, swiglu=False, every=False):
    t = tiles0(kind, N, M, n_sm, row_tiles, swiglu)
    if kind != "int8":
        return t
    name = "w13" if swiglu else "wqkv" if N >= lt.WIDE else None
    if name is None and every:  # wo and w2 (both N = 4096, not told apart here): wo's best
        name = "wo"
    return best[name][0] if name in best else t
ab_step.VARIANTS["digits-best"] = lambda: (lt, "default_tiles", lambda *a, **k: pick(*a, **k))
ab_step.VARIANTS["digits-best-all"] = lambda: (lt, "default_tiles", lambda *a, **k: pick(*a, **k, every=True))
ab_step.main(["int8-x-fp16", "main", "digits-best", "digits-best-all", "int8-x-fp16"], "Llama-2-7B", [8192], [32],
             "int8", False, 1, 128, "cuda", "bfloat16", f"{OUT}/digits_best_ab.json")
