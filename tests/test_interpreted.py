# The attention kernels of bifurcated_triton.py on a CPU, through Triton's interpreter (TRITON_INTERPRET=1,
# which must be set before Triton compiles anything: so in a child process), against the plain-PyTorch
# references: the split context (whole key blocks and a masked last one), the samples' own slots in both
# launch plans, the 128-row blocks of many rows, several prompts' levels, and the own slots kept apart
# for a merge launch (`side`: on a GPU a second stream; here the same launches one after the other).
# Small shapes only: the interpreter runs each program in numpy. The GPU suite (test_gpu.py) times nothing
# either but runs the real kernels at the real sizes.
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import torch
import bifurcated_triton as bt
from bifurcated import bifurcated_attention, prefix_attention

def rel(out, ref):
    return ((out - ref).norm() / ref.norm()).item()

torch.manual_seed(0)
worst = 0.0
for fused in (True, False):
    bt.own_fused = lambda *a, f=fused: f  # the own slots in the last launch, or split with the context's
    # n, H, Hkv, context (not whole blocks of 64 or 32), head dim, decode slots, filled; wide_rows 16: 128-row blocks
    for n, H, Hkv, M, D, T, filled in [(4, 4, 2, 100, 16, 8, 3), (8, 4, 1, 130, 32, 20, 17), (3, 2, 2, 64, 16, 4, 4)]:
        q, kc, vc = torch.randn(n, H, 1, D), torch.randn(Hkv, M, D), torch.randn(Hkv, M, D)
        kd, vd, slot = torch.randn(n, Hkv, T, D), torch.randn(n, Hkv, T, D), torch.tensor([filled - 1])
        ref = bifurcated_attention(q, kc, vc, kd, vd, slot)
        for tiles in (bt.Tiles(), bt.Tiles(block_n=32), bt.Tiles(wide_rows=16)):
            worst = max(worst, rel(bt.run_decode_attention(q, kc, vc, kd, vd, slot, tiles=tiles), ref))
            worst = max(worst, rel(bt.run_decode_attention(q, kc, vc, kd, vd, slot, tiles=tiles, side=True), ref))
    # several prompts: prefix (or none), prompts of unequal lengths, own slots
    for Np, n, H, Hkv, Mp, L, D, T, filled in [(3, 2, 4, 2, 40, 70, 16, 8, 5), (2, 4, 4, 4, 0, 65, 16, 8, 8),
                                                (2, 3, 2, 2, 64, 33, 16, 8, 2)]:
        B = Np * n
        q, kp, vp = torch.randn(B, H, 1, D), torch.randn(Hkv, Mp, D), torch.randn(Hkv, Mp, D)
        km, vm, lens = torch.randn(Np, Hkv, L, D), torch.randn(Np, Hkv, L, D), torch.randint(1, L + 1, (Np,))
        kd, vd, slot = torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D), torch.tensor([filled - 1])
        ref = prefix_attention(q, kp, vp, km, vm, lens, kd, vd, slot)
        for side in (False, True):
            levels = bt.prefix_levels(q, kp, vp, km, vm, lens)
            worst = max(worst, rel(bt.attend_levels(q, levels, kd, vd, slot, 0, side=side), ref))
print("worst relative error", worst)
assert worst < 1e-5, worst
"""


def test_attention_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "worst relative error" in r.stdout
