# one decode step (8K n=32 bf16) profiled under two ab_step variants in one process: kernel-busy vs span per step
# (gaps), one layer's kernel sequence with the gap before each (rope-in-qkv-profile-ab.txt, H100):
#   python bench/results/h100-80gb-hbm3/rope-in-qkv-profile-ab.py bf16
import sys, json, collections, torch
sys.path.insert(0, "."); sys.path.insert(0, "scripts")
import ab_step, profile_step, benchmark
weights = sys.argv[1] if len(sys.argv) > 1 else "bf16"
for variant in ("main", "rope-apart"):
    benchmark.release(torch.device("cuda"), True)
    path = f"/tmp/trace-{variant}.json"
    ab_step.with_variant(variant, lambda: profile_step.main("Llama-2-7B", 8192, 32, "bifurcated", 20, True, 6, path,
                                                            False, weights, None, 0))
    ev = json.load(open(path)); ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    ks = sorted((e for e in ev if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    busy = sum(e["dur"] for e in ks) / 20
    span = (ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]) / 20
    print(f"== {variant}: {len(ks) / 20:.1f} kernels a step, busy {busy:.0f} us, span {span:.0f} us a step "
          f"(gaps {span - busy:.0f})")
    lin = [e for e in ks if e["name"].startswith("_linear_kernel")]
    first = lin[129 * 10 + 4 * 5]  # step 10, layer 5's wqkv
    i = ks.index(first)
    prev_end = ks[i - 3]["ts"] + ks[i - 3]["dur"]
    for e in ks[i - 2: i + 9]:
        print(f"   gap {e['ts'] - prev_end:6.2f}  dur {e['dur']:7.2f}  {e['name'][:70]}")
        prev_end = e["ts"] + e["dur"]
    gaps = collections.defaultdict(list)
    for a, b in zip(ks, ks[1:]):
        gaps[b["name"][:40]].append(b["ts"] - a["ts"] - a["dur"])
    print("   mean gap before each kind:", {k: round(sum(v) / len(v), 2) for k, v in gaps.items() if len(v) >= 20})
