# The decode step, and how it is compiled for a GPU. The layers are all alike, so they go through
# one compiled graph whose inputs are each layer's weights and caches: compiling does not grow with
# depth (a 7B model on the H100: 65-99 s as one graph for the whole step, 1-13 s this way; on a CPU,
# 32 tiny layers: 53.9 s and 4.3 s). The final norm, the head and the sampling go
# through a second graph, with the decode loop's bookkeeping (DecodeLoop). The step is then recorded
# once as a CUDA graph and replayed: no launch overhead, no host sync. A short prompt's prefill runs
# eagerly, then as a CUDA graph too (prefill_step).
import functools
import hashlib
import resource
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor
from torch._inductor.custom_graph_pass import CustomGraphPass

from model import Transformer


def run_layer(layer: torch.nn.Module, x: Tensor, freqs_cis: Tensor, input_pos: Tensor) -> Tensor:
    return layer(x, freqs_cis, input_pos)


def decode_step(model: Transformer, tail: Callable, compile: bool) -> Callable:
    """step(tokens, input_pos): tokens (n, 1) at position input_pos (), or (n, 1) per row, through the
    layers, then tail(model, x) of the last layer's output x (n, 1, C) (sampling.next_tokens: next
    tokens and their log-probs). With compile, compiled as above."""
    layer = None  # run as they are
    if compile:
        # Dynamo keeps a function's compiled versions, one for each set of shapes it met, and with
        # fullgraph fails at the ninth (recompile_limit): a process that ran nine prompt lengths
        # stopped. A run keeps one set of shapes (generate_many), so a new one drops the others.
        for f in (run_layer, DecodeLoop.record):
            torch._dynamo.eval_frame.remove_from_cache(f)
        layer, tail = compile_graph(run_layer), compile_graph(tail)

    def step(tokens: Tensor, input_pos: Tensor) -> tuple[Tensor, ...]:
        return tail(model, model.hidden(tokens, input_pos, layer))

    return step


class SourcesInKey(CustomGraphPass):
    """A graph pass that changes nothing; its uuid, a hash of the project's files, goes into the key of
    Inductor's on-disk cache. That key holds the traced graph, not the Python inside the custom ops
    (linear_triton, bifurcated_triton: their tiles and launch plans), so after an edit of those a
    cached step would run the kernels from before it (seen on an H200: tiles-ab.md)."""
    files = tuple(sorted(Path(__file__).resolve().parent.glob("*.py")))

    def __call__(self, graph: torch.fx.Graph) -> None:
        pass

    def uuid(self) -> str:
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f.read_bytes())
        return digest.hexdigest()


SOURCES_IN_KEY = SourcesInKey()  # one object: dynamo takes a backend with other options as another backend


def compile_graph(fn: Callable) -> Callable:
    return torch.compile(fn, fullgraph=True, dynamic=False, options={"post_grad_custom_post_pass": SOURCES_IN_KEY})


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # process peak RSS (KiB on Linux)


class DecodeLoop:
    """The decode loop's state on the device, and advance(), one decode step that moves it on: the
    tokens and log-probs so far, out and logprobs (B, T), column 0 filled by start(); each advance
    fills the next column from the last token, at input_pos, then steps the position. The bookkeeping
    is in the tail (compiled with it, a few fused stores); with compile on CUDA, advance is one CUDA
    graph: nothing is copied in or out and the host only replays it. The state tensors are the same at
    every run, so a later run of the same sizes reuses the graph."""

    def __init__(self, model: Transformer, tail: Callable, B: int, T: int, input_pos: Tensor, compile: bool):
        device = input_pos.device
        self.out = torch.zeros(B, T, dtype=torch.long, device=device)  # (B, T)
        self.logprobs = torch.zeros(B, T, device=device)  # (B, T)
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)  # (B, 1): the last column's
        self.input_pos = input_pos.clone()  # () or (B, 1): their position
        self.col = torch.ones(1, dtype=torch.long, device=device)  # (1,): the column advance() fills
        step = decode_step(model, functools.partial(self.record, tail), compile)
        self.advance = functools.partial(step, self.tokens, self.input_pos)
        if compile and device.type == "cuda":
            self.advance = CUDAGraphStep(self.advance)

    def start(self, first: Tensor, logprob: Tensor, input_pos: Tensor):
        # first tokens (B,) and their log-probs (B,) from the prompt; input_pos: the first one's position
        self.out[:, 0], self.logprobs[:, 0] = first, logprob
        self.tokens.copy_(first[:, None])
        self.input_pos.copy_(input_pos)
        self.col.fill_(1)

    def record(self, tail: Callable, model: Transformer, x: Tensor):
        nxt, lp = tail(model, x)  # (B,) each
        self.out.index_copy_(1, self.col, nxt[:, None])
        self.logprobs.index_copy_(1, self.col, lp[:, None])
        self.tokens.copy_(nxt[:, None])
        self.input_pos.add_(1)
        self.col.add_(1)


class Progress:
    # The decode loop's progress on stderr, counted as the host enqueues steps: it never waits for the GPU.
    def __init__(self, total: int, show: bool = True):
        self.total, self.shown, self.active = total, -1, show and total >= 64 and sys.stderr.isatty()

    def update(self, done: int):
        pct = 100 * done // self.total
        if self.active and pct != self.shown:
            self.shown = pct
            sys.stderr.write(f"\rdecoding {done}/{self.total} steps ({pct}%)")
            sys.stderr.flush()

    def close(self):
        if self.active:
            sys.stderr.write("\r" + " " * 40 + "\r")


GRAPH_PREFILL_MAX = 2048  # prompts of up to this many tokens prefill as a CUDA graph (prefill_step)


def prefill_step(model: Transformer, S: int, compile: bool) -> Callable:
    """prefill(ids): a prompt's ids (1, S) through the model, filling the caches, to its last position's
    logits (1, 1, V). The prefill runs eagerly (its products are compute-bound; compiling every prompt
    length would cost more than it saves), but a short one is bound by the host's launches: 1K tokens
    of a 7B model on an H100 took 27-40 ms so inside generate runs, 20.5 ms replayed as a CUDA graph
    (profile-prefill.md). So with compile on CUDA, up to GRAPH_PREFILL_MAX tokens, the second run of a
    length records it as a CUDA graph (the first runs it as it is) and later ones replay it with their
    own ids. The graph keeps the activations of one prefill, which the memory planner's workspace counts."""
    pos = torch.arange(S, device=model.output.weight.device)
    step = lambda ids: model(ids, pos, last_only=True)
    if compile and pos.is_cuda and S <= GRAPH_PREFILL_MAX:
        return CUDAGraphStep(step, warmup=1)
    return step


class CUDAGraphStep:
    """A step (a decode step, a prefill) recorded as one CUDA graph: its first `warmup` calls run it as
    it is (they compile it), the next records it, then each call copies its inputs into the recorded
    ones, replays, and returns the recorded outputs (overwritten by the next call). The step has no
    host syncs and static shapes; the tensors it reads and writes other than its inputs are the same
    at every call."""

    def __init__(self, step: Callable, warmup: int = 2):
        self.step, self.warmup = step, warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.inputs: tuple[Tensor, ...] = ()
        self.outputs: tuple[Tensor, ...] = ()

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if self.graph is not None:
            for mine, given in zip(self.inputs, inputs):
                mine.copy_(given)
            self.graph.replay()
            return self.outputs
        if self.warmup > 0:  # on a side stream, as CUDA graphs want of their warm-up
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        self.inputs = tuple(t.clone() for t in inputs)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.step(*self.inputs)
        self.graph.replay()  # recording ran nothing: this call's step
        return self.outputs
