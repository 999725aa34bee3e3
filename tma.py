# Kernel launches with TMA descriptors (Tiles.tma of linear_triton and bifurcated_triton): Triton's host-made
# TensorDescriptor of a tensor, which the launch turns into the 128-byte tensor map that the Hopper's tensor memory
# accelerator copies tiles by. Inductor cannot trace such a launch inside a triton_op: its tracing of an op's body
# keeps every argument that is not a tensor as a constant of the graph, there a descriptor of a fake tensor
# (torch/_higher_order_ops/triton_kernel_wrap.py: "TMA descriptor capturing not yet supported in non-dynamo
# tracing"). So such a kernel goes through one opaque op, `tma::launch`, which makes the descriptors of the real
# tensors each time it runs. Inductor fuses around it as around any op, and a CUDA graph captures the launch with
# its tensor maps, the tensors' addresses being static there.
import importlib
import inspect
import json
from typing import Optional

import torch
from torch import Tensor
try:  # Triton 3.4 on
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


def run(kernel, grid: tuple, *args, tma: Optional[dict] = None, writes: tuple[str, ...] = (), **kwargs):
    """kernel[grid](*args, **kwargs) as a traced op's kernel (wrap_triton); with tma, {name: (shape, block)}, each
    argument so named goes in as a TensorDescriptor of its view `shape` (None: as it is) in `block` tiles, the
    kernel's TMA constexpr is set, and the launch goes through tma::launch. writes: the names of the tensors the
    kernel writes (with tma)."""
    if not tma:
        return torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
    if TensorDescriptor is None:
        raise RuntimeError("Tiles.tma needs Triton 3.4 or later (triton.tools.tensor_descriptor)")
    named = dict(zip(inspect.signature(kernel.fn).parameters, args), **kwargs, TMA=True)
    if not all(isinstance(named.get(w), Tensor) for w in writes):
        raise ValueError(f"{kernel.fn.__name__} writes {writes}, which are not all tensors among its arguments")
    written, reads, tensors, consts = [named[w] for w in writes], [], {}, {}
    for name, a in named.items():
        if not isinstance(a, Tensor):
            consts[name] = a
            continue
        w = next((i for i, t in enumerate(written) if t is a), None)  # (an unused argument may be a written one)
        i = next((i for i, t in enumerate(reads) if t is a), len(reads))  # one entry for a tensor passed twice
        if w is None and i == len(reads):
            reads.append(a)
        tensors[name] = ("r", i) if w is None else ("w", w)
    tiles = {name: (shape and list(shape), list(block)) for name, (shape, block) in tma.items()}
    spec = dict(kernel=(kernel.fn.__module__, kernel.fn.__name__), grid=[int(g) for g in grid], consts=consts,
                tensors=tensors, tma=tiles)
    torch.ops.tma.launch(json.dumps(spec), reads, written)


@torch.library.custom_op("tma::launch", mutates_args=("written",))
def launch(spec: str, reads: list[Tensor], written: list[Tensor]) -> None:
    s = json.loads(spec)
    module, fn = s["kernel"]
    kernel = getattr(importlib.import_module(module), fn)
    args = dict(s["consts"])
    for name, (kind, i) in s["tensors"].items():
        args[name] = (written if kind == "w" else reads)[i]
    for name, (shape, block) in s["tma"].items():
        t = args[name]
        args[name] = TensorDescriptor.from_tensor(t if shape is None else t.view(shape), block)
    kernel[tuple(s["grid"])](**args)


@launch.register_fake
def _(spec: str, reads: list[Tensor], written: list[Tensor]) -> None:
    return None
