# One interface over the two tokenizer formats Llama-family checkpoints ship with:
# sentencepiece protobufs (Llama 1/2, Mistral, TinyLlama) and tiktoken rank files (Llama 3).
# The kind is read from the file's content, because both are conventionally named
# `tokenizer.model`.
import base64
import re
from pathlib import Path
from typing import Optional, Sequence

import sentencepiece as spm
import tiktoken

# Llama-3's pre-tokenizer: BPE merges never cross these pieces, so digits group by at most 3,
# contractions split off, and a space sticks to the word after it.
LLAMA3_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama-3 reserves 256 ids after the base vocabulary, in this order.
NUM_SPECIAL = 256
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_SPECIAL - 5)]

_RANK_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")
_SNIFF_LINES = 8


class Tokenizer:
    vocab_size: int
    bos_id: int | None
    eos_id: int
    stop_ids: frozenset[int]

    def encode(self, text: str, bos: bool = True) -> list[int]:
        prefix = [self.bos_id] if bos and self.bos_id is not None else []
        return prefix + self._encode(text)

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def continuation(self, prompt_ids: list[int], ids: list[int]) -> str:
        # Decoding the new ids alone can lose a leading space (sentencepiece strips one at the start
        # of a text), so decode prompt + new ids and cut the prompt's text off.
        head, full = self.decode(prompt_ids), self.decode(prompt_ids + ids)
        return full[len(head) :] if full.startswith(head) else self.decode(ids)

    def stop_at(self, prompt_ids: list[int], ids: list[int], stop: Sequence[str], since: int = 0) -> Optional[int]:
        """How many of ids, the continuation of prompt_ids, it takes for their text to hold one of
        the stop texts; None where it holds none. since: the text of ids[:since] was seen to hold none,
        so a stop text can only end after it: the first look decodes only the ids from a margin before
        `since` on (each id adds a byte at least), not the whole row again at every check. A number is
        exact; a None with since > 0 is a look, not the last word (a text that decodes otherwise in a
        window, as a sentencepiece space can, may be found later, with since 0)."""
        def found(k: int, start: int = 0) -> bool:
            head = (prompt_ids + ids[:start])[-8:] if start else prompt_ids
            text = self.continuation(head, ids[start:k])
            return any(s in text for s in stop)

        start = max(0, since - max(len(s.encode()) for s in stop) - 4)
        if not found(len(ids), start):
            return None
        lo, hi = 0, len(ids)  # the text of ids[:hi] holds a stop text and that of ids[:lo] none; the
        while hi - lo > 1:  # text only grows with ids, so halving the range finds the first that does
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if found(mid) else (mid, hi)
        return hi


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, sp: spm.SentencePieceProcessor):
        self.sp = sp
        self.vocab_size = sp.vocab_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None  # -1 means the model has none
        self.eos_id = sp.eos_id()
        self.stop_ids = frozenset({self.eos_id})

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


class TiktokenTokenizer(Tokenizer):
    def __init__(self, ranks: dict[bytes, int], name: str):
        n = len(ranks)
        specials = {tok: n + i for i, tok in enumerate(LLAMA3_SPECIALS)}
        self.enc = tiktoken.Encoding(
            name, pat_str=LLAMA3_PAT, mergeable_ranks=ranks, special_tokens=specials
        )
        self.vocab_size = n + NUM_SPECIAL
        self.bos_id = specials["<|begin_of_text|>"]
        self.eos_id = specials["<|end_of_text|>"]
        # Chat models end a turn with <|eot_id|> rather than <|end_of_text|>.
        self.stop_ids = frozenset({self.eos_id, specials["<|eot_id|>"]})

    def _encode(self, text: str) -> list[int]:
        # Special-token text in user input is encoded as plain text, so a prompt cannot
        # forge a header or end-of-turn marker.
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(list(ids))


def _looks_like_tiktoken(data: bytes) -> bool:
    # A rank file is ASCII lines of `<base64 token> <rank>`; a sentencepiece model is a
    # binary protobuf, whose first lines (if it has any) never look like that.
    head = [line.strip() for line in data.splitlines() if line.strip()][:_SNIFF_LINES]
    return bool(head) and all(_RANK_LINE.fullmatch(line) for line in head)


def _read_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    # Parsed here rather than with tiktoken.load_tiktoken_bpe, which caches by path name in
    # a temp dir and would serve a stale copy once the file at that path changes.
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if not _RANK_LINE.fullmatch(line):
            raise ValueError(
                f"cannot read tokenizer {path}: line {lineno} is not '<base64> <rank>'"
            )
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    # Special ids are numbered from len(ranks), so ranks must be exactly 0..N-1; and
    # tiktoken can only encode arbitrary text if every single byte is a token.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"cannot read tokenizer {path}: ranks are not 0..N-1 without repeats")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError(f"cannot read tokenizer {path}: not every single byte is a token")
    return ranks


def load_tokenizer(path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    data = path.read_bytes()
    if _looks_like_tiktoken(data):
        return TiktokenTokenizer(_read_ranks(data, path), name=path.name)
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError as e:  # sentencepiece's "could not parse ModelProto" and friends
        raise ValueError(
            f"cannot read tokenizer {path}: not a sentencepiece or tiktoken model"
        ) from e
    if sp.eos_id() < 0:
        raise ValueError(f"cannot read tokenizer {path}: sentencepiece model has no eos token")
    return SentencePieceTokenizer(sp)
