# The context part of decode attention at many rows: our context launch vs cuDNN / flash SDPA with the
# context split over the batch axis; each checked against an fp32 reference of that layer's context attention.
# Every row to $OUT/r/lib_ctx.json (OUT: a folder, default the current one, holding r/):
#   mkdir -p r && python scripts/lib_context.py
import itertools, json, math, sys, os
sys.path.insert(0, os.getcwd())
import torch, triton.testing
from bifurcated_triton import context_partials, LOG2E

def time_us(fn, sets):
    def all_sets():
        for s in sets:
            fn(*s)
    return 1e3 * triton.testing.do_bench_cudagraph(all_sets, rep=100, return_mode="median") / len(sets)

def merged_ours(q, k, v):
    o, l = context_partials(q, k, v)  # (P, Hkv, R, D), (P, Hkv, R) log2
    w = torch.softmax(l * math.log(2), dim=0)  # exact merge
    return (w[..., None] * o).sum(0)  # (Hkv, R, D)

def lib(kind, S, q, k, v):
    n, H, _, D = q.shape; Hkv, M, _ = k.shape; G = H // Hkv; R = n * G
    qq = q.view(n, Hkv, G, D).permute(1, 0, 2, 3).reshape(Hkv, R, D)
    qs = qq.unsqueeze(0).expand(S, Hkv, R, D)
    ks = k.view(Hkv, S, M // S, D).permute(1, 0, 2, 3)
    vs = v.view(Hkv, S, M // S, D).permute(1, 0, 2, 3)
    if kind == "cudnn":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(qs, ks, vs, None, True, 0.0, False, False)
    elif kind == "cudnn-c":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(qs.contiguous(), ks.contiguous(), vs.contiguous(), None, True, 0.0, False, False)
    else:
        r = torch.ops.aten._scaled_dot_product_flash_attention(qs.contiguous(), ks, vs)
    return r[0], r[1]  # (S, Hkv, R, D), lse (S, Hkv, R[,1]) natural log

def merged_lib(kind, S, q, k, v):
    o, l = lib(kind, S, q, k, v)
    l = l.reshape(S, o.size(1), o.size(2)).float()
    w = torch.softmax(l, dim=0)
    return (w[..., None] * o.float()).sum(0)

def reference(q, k, v):
    n, H, _, D = q.shape; Hkv = k.size(0); G = H // Hkv
    qq = q.view(n, Hkv, G, D).permute(1, 0, 2, 3).reshape(Hkv, n * G, D).float()
    s = qq @ k.float().transpose(1, 2) / math.sqrt(D)
    return torch.softmax(s, -1) @ v.float()

rows = []
for Hkv, M, n in [(32, 8192, 256), (32, 8192, 512), (8, 8192, 64), (8, 8192, 256), (32, 4096, 512), (32, 8192, 32)]:
    H, D = 32, 128
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
    sets = [(rnd(n, H, 1, D), rnd(Hkv, M, D), rnd(Hkv, M, D)) for _ in range(3)]
    ref = reference(*sets[0])
    flops = 4 * H * n * M * D
    cands = [("ours", 0)] + [(k, S) for k in ("cudnn", "flash") for S in (1, 2, 4, 8)]
    for kind, S in cands:
        try:
            f = merged_ours if kind == "ours" else (lambda q, k, v, kind=kind, S=S: merged_lib(kind, S, q, k, v))
            err = ((f(*sets[0]) - ref).norm() / ref.norm()).item()
            g = (lambda q, k, v: context_partials(q, k, v)) if kind == "ours" else (lambda q, k, v, kind=kind, S=S: lib(kind, S, q, k, v))
            us = time_us(g, sets)
        except Exception as e:
            print(f"Hkv {Hkv} M {M} n {n} {kind} S={S}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        r = dict(kv_heads=Hkv, context=M, n=n, kind=kind, splits=S, us=us, tflops=flops / us / 1e6, rel_err=err)
        rows.append(r)
        print(f"Hkv {Hkv} M {M} n {n} {kind} S={S}: {us:.1f} us {r['tflops']:.0f} TFLOP/s err {err:.2e}", flush=True)
out = os.environ.get("OUT", ".")
json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), open(f"{out}/r/lib_ctx.json", "w"), indent=1)
