# Train the small Python code model that generate.py loads by default, on a corpus every machine
# has offline: the standard library of the running interpreter. Reproducible: the corpus split
# is a hash of each file's path (recorded in split.json), the tokenizer and the batches are seeded.
#
#   python scripts/train_tiny.py --out_dir models/tiny-code          # the shipped model (GPU: minutes)
#   python scripts/train_tiny.py --out_dir /tmp/t --max_files 20 --steps 5 --dim 32 --n_layer 2 --seq_len 64
import argparse
import ast
import hashlib
import io
import json
import math
import os
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `from model import ...` as a script

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from checkpoint import CHECKPOINT_FILE, TOKENIZER_FILE, resolve_device
from model import ModelArgs, Transformer


def stdlib_files(stdlib: Path, max_files: int = 0) -> list[str]:
    """Relative paths of the stdlib's .py files that read as UTF-8 and parse (third-party packages
    and deliberately broken test files left out), sorted."""
    paths = []
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts:
            continue
        try:
            ast.parse(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
            continue
        paths.append(rel.as_posix())
        if max_files and len(paths) == max_files:
            break
    return paths


def is_held_out(relpath: str, percent: int) -> bool:
    # by a hash of the path: the same file lands on the same side on every machine and version
    return int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 100 < percent


def train_tokenizer(texts: list[str], vocab_size: int) -> bytes:
    model = io.BytesIO()
    # Code wants its whitespace: no normalization, no dummy prefix, runs of spaces may be pieces,
    # a newline is one token; bytes cover whatever the corpus lacks.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=1 << 22, input_sentence_size=0, user_defined_symbols=["\n"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=os.cpu_count() or 1, minloglevel=2)  # BPE on all input: deterministic
    return model.getvalue()


def encode_files(sp: spm.SentencePieceProcessor, texts: list[str]) -> torch.Tensor:
    # every file is one document: BOS, its tokens, EOS
    ids = []
    for t in texts:
        ids += [sp.bos_id(), *sp.encode(t), sp.eos_id()]
    return torch.tensor(ids, dtype=torch.int32)


def batches(tokens: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator):
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=gen)
    rows = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()]).long()  # (B, S + 1)
    return rows[:, :-1], rows[:, 1:]


def loss_of(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x, torch.arange(x.size(1), device=x.device))  # (B, S, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def held_out_loss(model, tokens: torch.Tensor, seq_len: int, device, max_windows: int, autocast) -> float:
    # consecutive windows from the start of the held-out stream: the same windows every time
    n = min(max_windows, (len(tokens) - 1) // seq_len)
    rows = tokens[: n * seq_len + 1]
    x = rows[:-1].view(n, seq_len).long().to(device)
    y = rows[1:].reshape(n, seq_len).long().to(device)
    with autocast:
        return sum(loss_of(model, x[i : i + 16], y[i : i + 16]).item() * len(x[i : i + 16])
                   for i in range(0, n, 16)) / n


def main(out_dir: str, steps: int, batch_size: int, seq_len: int, dim: int, n_layer: int, n_head: int,
         n_kv_heads: int, vocab_size: int, lr: float, seed: int, held_out_percent: int, max_files: int,
         eval_every: int, device: str | None, compile: bool):
    t_start = time.time()
    dev = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(stdlib, max_files)
    held = [f for f in files if is_held_out(f, held_out_percent)]
    train = [f for f in files if not is_held_out(f, held_out_percent)]
    if not held or not train:
        raise ValueError(f"{len(files)} files give an empty split; use more files or another --held_out_percent")
    print(f"corpus: {len(train)} training and {len(held)} held-out files from {stdlib}")
    read = lambda rels: [(stdlib / r).read_text(encoding="utf-8") for r in rels]
    train_texts, held_texts = read(train), read(held)

    sp_bytes = train_tokenizer(train_texts, vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    train_tokens, held_tokens = encode_files(sp, train_texts), encode_files(sp, held_texts)
    print(f"tokens: {len(train_tokens):,} training, {len(held_tokens):,} held out (vocab {sp.vocab_size()})")

    torch.manual_seed(seed)
    config = ModelArgs(block_size=seq_len, vocab_size=sp.vocab_size(), n_layer=n_layer, n_head=n_head,
                       n_kv_heads=n_kv_heads, dim=dim, intermediate_size=None)
    with torch.device(dev):
        model = Transformer(config)
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                torch.nn.init.normal_(p, 0.0, 0.02)
        model.setup(seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {config}")
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine down to 10%
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    step_fn = torch.compile(loss_of) if compile else loss_of
    gen = torch.Generator().manual_seed(seed)
    log = []
    for step in range(1, steps + 1):
        x, y = (t.to(dev, non_blocking=True) for t in batches(train_tokens, batch_size, seq_len, gen))
        with autocast:
            loss = step_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % eval_every == 0 or step == steps:
            model.eval()
            val = held_out_loss(model, held_tokens, seq_len, dev, 256, autocast)
            model.train()
            log.append(dict(step=step, train_loss=loss.item(), held_out_loss=val, seconds=time.time() - t_start))
            print(f"step {step}/{steps}: train loss {loss.item():.3f}, held-out loss {val:.3f} "
                  f"({time.time() - t_start:.0f} s)", flush=True)

    # Save like the converter does: bf16 weights with the config in the metadata, tokenizer beside.
    state = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in model.state_dict().items()}
    with tempfile.NamedTemporaryFile(dir=out, suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
    save_file(state, str(tmp), metadata={"format": "pt", "config": config.to_json()})
    tmp.chmod(0o644)  # temporary files are created private
    tmp.replace(out / CHECKPOINT_FILE)
    (out / TOKENIZER_FILE).write_bytes(sp_bytes)
    (out / "split.json").write_text(json.dumps(dict(
        python=platform.python_version(), stdlib=str(stdlib), held_out_percent=held_out_percent,
        rule="held out if int(sha1(relative path), 16) % 100 < held_out_percent",
        train=train, held_out=held), indent=1))
    (out / "train_log.json").write_text(json.dumps(dict(
        command=" ".join(sys.argv), torch=torch.__version__, device=str(dev),
        gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        parameters=n_params, train_tokens=len(train_tokens), held_out_tokens=len(held_tokens),
        final_held_out_loss=log[-1]["held_out_loss"], log=log), indent=1))
    print(f"held-out loss {log[-1]['held_out_loss']:.3f}; wrote {out / CHECKPOINT_FILE} "
          f"({(out / CHECKPOINT_FILE).stat().st_size / 2**20:.1f} MiB) and {out / TOKENIZER_FILE}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Train the small default code model on the Python standard library.")
    p.add_argument("--out_dir", default="models/tiny-code")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=1024, help="training context, also the model's maximum length")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--n_kv_heads", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held_out_percent", type=int, default=5)
    p.add_argument("--max_files", type=int, default=0, help="use only the first N files (0: all); for quick tests")
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    args = p.parse_args()
    try:
        main(**vars(args))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
