# One rank of the tensor-parallel test (tests/test_tp.py launches it with torchrun, gloo on CPU):
# the same computations as the single-process reference there, results saved by rank 0.
import sys

import torch

import tp
from generate import generate
from test_generate import CONFIGS, prompt_ids, step_logits, tiny_model


def run_all(rank: int = 0, world: int = 1) -> dict:
    # each rank's free memory differs and all must plan with the smallest: rank 0's is the largest here
    results = {"smallest free": tp.smallest_on_all_ranks(10 + world - 1 - rank)}
    prompt = prompt_ids(29)
    tokens = torch.randint(0, 512, (4, 10), generator=torch.Generator().manual_seed(3))
    for name in CONFIGS:
        model = tiny_model(name)
        if world > 1:
            tp.apply_tp(model, rank, world)
        for attention in ("bifurcated", "standard"):
            results[name, attention, "logits"] = torch.stack(step_logits(model, attention, prompt, tokens))
            for temperature in (0.0, 1.0):
                results[name, attention, temperature] = generate(
                    model, prompt, num_samples=4, max_new_tokens=12, temperature=temperature, seed=5,
                    attention=attention).tokens
    return results


if __name__ == "__main__":
    rank, world, _ = tp.world_info()
    tp.init_distributed(torch.device("cpu"))
    results = run_all(rank, world)
    if rank == 0:
        torch.save(results, sys.argv[1])
    tp.exit_distributed()
