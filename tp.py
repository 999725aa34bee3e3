# Tensor parallelism over torch.distributed, applied to a loaded plain model (one process per GPU,
# launched with torchrun; gloo on CPU). Attention is split by heads and the MLP by its hidden
# width (Megatron style): wqkv and w13 keep this rank's rows (column-parallel), wo and w2 this
# rank's columns (row-parallel), and one all-reduce after each sums the partial outputs. Each
# rank's caches then hold only its KV heads; bifurcated attention runs unchanged on them. The
# embedding, norms and output head are replicated, so every rank holds the same logits and, with
# the same seed, draws the same samples.
#
#   torchrun --standalone --nproc_per_node=2 generate.py --checkpoint_path ... --num_samples 32
import dataclasses
import os
import sys
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from model import Transformer


def world_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns this rank's device."""
    rank, world, local_rank = world_info()
    if device.type == "cuda":
        if world > torch.cuda.device_count():  # the same answer on every rank: they all stop alike
            raise ValueError(f"{world} ranks need {world} GPUs; this machine shows {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    return device


def check_world_size(n_head: int, n_kv_heads: int, intermediate_size: int, world: int):
    if n_head % world:
        raise ValueError(f"the world size {world} must divide the {n_head} query heads")
    if n_kv_heads % world and world % n_kv_heads:
        raise ValueError(f"the world size {world} must divide the {n_kv_heads} KV heads or be a multiple of them")
    if intermediate_size % world:
        raise ValueError(f"the world size {world} must divide the MLP width {intermediate_size}")


def kv_heads_of(rank: int, world: int, n_kv_heads: int) -> range:
    # With fewer KV heads than ranks (MQA, or GQA on many GPUs), several ranks hold a copy of
    # the one KV head their query heads use.
    if n_kv_heads >= world:
        per = n_kv_heads // world
        return range(rank * per, (rank + 1) * per)
    head = rank // (world // n_kv_heads)
    return range(head, head + 1)


def apply_tp(model: Transformer, rank: int, world: int) -> Transformer:
    cfg = model.config
    check_world_size(cfg.n_head, cfg.n_kv_heads, cfg.intermediate_size, world)
    H, Hkv, D, F = cfg.n_head, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size
    Hl, Fl, kv = H // world, F // world, kv_heads_of(rank, world, Hkv)
    for layer in model.layers:
        attn, ff = layer.attention, layer.feed_forward
        dev = attn.wqkv.weight.device
        arange = lambda a, b: torch.arange(a, b, device=dev)
        # this rank's q heads, then its K and V heads, as rows of the fused wqkv
        qkv = torch.cat([arange(rank * Hl * D, (rank + 1) * Hl * D), H * D + arange(kv.start * D, kv.stop * D),
                         (H + Hkv) * D + arange(kv.start * D, kv.stop * D)])  # ((Hl + 2 Hkv_local) D,)
        take_rows(attn.wqkv, qkv)  # column parallel
        take_cols(attn.wo, rank * Hl * D, (rank + 1) * Hl * D)  # row parallel: partial sums
        attn.n_head, attn.n_kv_heads = Hl, len(kv)
        # this rank's gate rows, then its up rows, of the fused w13
        take_rows(ff.w13, torch.cat([arange(rank * Fl, (rank + 1) * Fl), F + arange(rank * Fl, (rank + 1) * Fl)]))
        take_cols(ff.w2, rank * Fl, (rank + 1) * Fl)
        for module in (attn.wo, ff.w2):  # their partial sums, before the residual is added
            module.register_forward_hook(all_reduce_output)
    # the local shapes: caches and the memory planner read them from here
    model.config = dataclasses.replace(cfg, n_head=Hl, n_kv_heads=len(kv), intermediate_size=Fl)
    return model


def take_rows(linear: nn.Module, idx: torch.Tensor):
    """Keep the output channels idx (column parallelism). Quantized layers know their own layout."""
    if type(linear) is nn.Linear:
        linear.weight = nn.Parameter(linear.weight.index_select(0, idx), requires_grad=False)
    else:
        linear.take_rows(idx)
    linear.out_features = len(idx)


def take_cols(linear: nn.Module, start: int, stop: int):
    """Keep the input channels start..stop (row parallelism: the outputs are partial sums)."""
    if type(linear) is nn.Linear:
        linear.weight = nn.Parameter(linear.weight[:, start:stop].contiguous(), requires_grad=False)
    else:
        linear.take_cols(start, stop)
    linear.in_features = stop - start


def all_reduce_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    # functional collective: traceable by torch.compile and captured in CUDA graphs
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def same_on_all_ranks(value: int) -> int:
    """Rank 0's value, everywhere (a seed: every rank must draw the same samples)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def smallest_on_all_ranks(value: Optional[int]) -> Optional[int]:
    """The smallest of the ranks' values, everywhere (free memory: all ranks must make one plan)."""
    if not dist.is_initialized() or value is None:
        return value
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return min(values)


def exit_distributed():
    """Ends a successful distributed run (nothing in a single process): all ranks leave together,
    and the process exits here, skipping the interpreter's teardown, where gloo's threads were seen
    to abort a process that had done its work (about 1 run in 8 on CPU)."""
    if dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another still uses them
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
