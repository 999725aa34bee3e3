# The linear kernels of a profiled decode step by role (wqkv, wo, w13, w2; the output layer): mean us each, from
#   python scripts/profile_step.py --weights W --trace T.json
#   python bench/results/h100-80gb-hbm3/narrow-tiles-layers.py T.json
# (Llama-2-7B: 129 _linear_kernel launches a step, 4 a layer in this order, the output layer last)
import json, sys, collections
for path in sys.argv[1:]:
    ev = json.load(open(path))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    ks = sorted((e for e in ev if e.get("cat") == "kernel" and e.get("name", "").startswith("_linear_kernel")),
                key=lambda e: e["ts"])
    roles = collections.defaultdict(list)
    for i, e in enumerate(ks):
        j = i % 129
        roles["output" if j == 128 else ("wqkv", "wo", "w13", "w2")[j % 4]].append(e["dur"])
    print(path, len(ks), "linear kernels")
    for r, d in roles.items():
        print(f"  {r}: {sum(d) / len(d):.1f} us mean over {len(d)}")
