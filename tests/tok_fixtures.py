# Tiny tokenizers built offline in well under a second, so tests never need a model hub.
# Both are written as `tokenizer.model`, the name real checkpoints use for either format.
import base64
import io
import random
import re
from collections import Counter
from pathlib import Path

import sentencepiece as spm

_WORDS = (
    "the model reads a prompt and writes one token at a time until it sees a stop token "
    "attention keys values cache layer head batch sample context length decode prefill "
    "we measure latency and throughput on a small machine with a large memory"
).split()
_CODE = [
    "def forward(self, x):\n    return self.output(self.norm(x))\n",
    "for i in range(10):\n    print(i, i * 2)\n",
    "class Attention(nn.Module):\n    def __init__(self, dim: int):\n        super().__init__()\n",
    "if x is None:\n\traise ValueError(\"missing input\")\n",
    "y = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # (B, H, T, T)\n",
    "import os, sys\nkv_cache = {'k': [], 'v': []}\n",
]


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    # English-like lines with numbers and punctuation, interleaved with Python snippets.
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        if i % 4 == 3:
            lines.append(rng.choice(_CODE))
        else:
            words = rng.choices(_WORDS, k=rng.randint(5, 15))
            words[0] = words[0].capitalize()
            end = rng.choice([".", ",", "?", f" {rng.randint(0, 9999)}."])
            lines.append(" ".join(words) + end)
    return lines


def make_sentencepiece(dirpath, vocab_size: int = 400, bos: bool = True) -> Path:
    # Llama-2's trainer settings: BPE, byte fallback (any text round-trips), digits split,
    # and no normalization or whitespace collapsing. The corpus supports vocab_size from about
    # 340 (256 bytes + 3 specials + every character seen) to about 980.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1 if bos else -1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,  # sentencepiece logs every training step to stderr otherwise
    )
    path = Path(dirpath) / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def learn_merges(text: str, n_merges: int) -> list[bytes]:
    # Greedy byte-pair encoding within pre-tokenized words (as tiktoken applies merges):
    # repeatedly fuse the most frequent adjacent pair; ties go to the smaller pair so the
    # result is deterministic. Returns n_merges distinct new tokens, in the order learned.
    words = Counter(re.findall(r" ?\w+| ?[^\w\s]+|\s+", text))
    seqs = {w: [bytes([b]) for b in w.encode()] for w in words}
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += words[w]
        if not pairs:
            raise ValueError(f"corpus too small for {n_merges} merges")
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        if a + b not in merges and len(a + b) > 1:  # the same bytes can come from two pairs
            merges.append(a + b)
        for w, seq in seqs.items():
            i, out = 0, []
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


def write_tiktoken(path, tokens: list[bytes]) -> Path:
    # The Llama-3 rank file format: one `<base64 token> <rank>` line per token, rank = line index.
    path = Path(path)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


def make_tiktoken(dirpath, n_merges: int = 256) -> Path:
    # The 256 single bytes at ranks 0..255, then merged tokens in the order they were learned,
    # so every token is the concatenation of two lower-ranked ones. The corpus supports up to
    # about 450 merges; vocab_size is 256 + n_merges + 256 specials.
    tokens = [bytes([b]) for b in range(256)] + learn_merges("\n".join(corpus()), n_merges)
    return write_tiktoken(Path(dirpath) / "tokenizer.model", tokens)
