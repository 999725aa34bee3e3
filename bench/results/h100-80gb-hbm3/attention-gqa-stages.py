# Run from the repository root: `python bench/results/h100-80gb-hbm3/attention-gqa-stages.py`
# (attention-gqa-stages.md)
# next session: GQA at 128 rows per KV head (Mistral n = 32), one layer: fewer stages with more programs an SM
# (latency-bound chain, 2 programs an SM by shared memory at 3 stages), against the default
import itertools, sys, os
sys.path.insert(0, "scripts"); sys.path.insert(0, ".")
import bench_attention as b
from bifurcated_triton import Tiles
b.SWEEP = [Tiles(max_rows=r, block_n=bn, waves=w, stages=s, wide_rows=None, mid_rows=None)
           for r, bn, w, s in [(64, 64, 3, 2), (64, 64, 4, 2), (64, 32, 3, 3), (64, 32, 4, 2), (64, 32, 6, 2),
                               (64, 64, 2, 2), (128, 64, 2, 2), (64, 128, 2, 2), (32, 64, 4, 3), (32, 64, 4, 2)]]
b.main(32, [8], 128, [8192], [32, 64], [64], True, os.environ.get("OUT", ".") + "/attention-gqa-stages.json")
