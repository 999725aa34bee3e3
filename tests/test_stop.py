# Stop texts: a sample ends where its text comes to one of them. Against the same run without them
# (same seed): the same tokens up to the stop, the text cut before it; where a tokenizer finds the
# first token that completes it; several prompts as each alone; the CLI's escapes and errors.
import json

import pytest
import torch

import tok_fixtures
from checkpoint import DEFAULT_CHECKPOINT, load_model
from generate import complete, complete_many, unescape
from test_cli import assert_one_line_error, run_cli
from tokenizer import load_tokenizer

PROMPT = "def fibonacci(n):\n    "


@pytest.fixture(scope="module")
def tiny_code():
    return load_model(str(DEFAULT_CHECKPOINT), "cpu", torch.float32)


@pytest.mark.parametrize("kind", ["sp", "tt"])
def test_tokenizer_finds_the_token_that_completes_a_stop_text(kind, tmp_path):
    make = tok_fixtures.make_sentencepiece if kind == "sp" else tok_fixtures.make_tiktoken
    tok = load_tokenizer(make(tmp_path))
    prompt = tok.encode("for i in range(10):")
    ids = tok.encode("\n    print(i, i * 2)  # café ☕\nclass Attention(nn.Module):\n", bos=False)
    for stop in (["print"], ["\nclass", "* 2"], [")  #"], ["i"], ["é"], ["☕\nc"]):  # bytes of one character apart
        k = tok.stop_at(prompt, ids, stop)
        assert any(s in tok.continuation(prompt, ids[:k]) for s in stop)
        assert not any(s in tok.continuation(prompt, ids[: k - 1]) for s in stop)
        for since in range(k):  # ids[:since] hold none: a look from near `since` on finds the same token
            assert tok.stop_at(prompt, ids, stop, since) == k
    assert tok.stop_at(prompt, ids, ["while"]) is None
    assert tok.stop_at(prompt, [], ["i"]) is None


@pytest.mark.parametrize("kind", ["sp", "tt"])
def test_a_later_look_for_stop_texts_decodes_only_the_new_ids(kind, tmp_path, monkeypatch):
    # at each check of a long sample, the text from the last check on: not the whole row again
    tok = load_tokenizer((tok_fixtures.make_sentencepiece if kind == "sp" else tok_fixtures.make_tiktoken)(tmp_path))
    ids = tok.encode("x = [i * 2 for i in range(10)]\n" * 40, bos=False)
    decoded = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda xs: decoded.append(len(xs)) or decode(xs))
    assert tok.stop_at(ids[:8], ids, ["while"], since=len(ids) - 16) is None
    assert len(ids) > 400 and max(decoded) <= 8 + 16 + len("while") + 4
    decoded.clear()
    assert tok.stop_at(ids[:8], ids, ["while"]) is None and max(decoded) == 8 + len(ids)  # since 0: all of it


def mean_logprob(model, vocab_size: int, prompt: list[int], tokens: list[int]) -> float:
    # the whole sequence at once, without a cache: each new token's log-prob at temperature 1
    ids = torch.tensor([prompt + tokens])  # (1, S)
    model.setup(ids.size(1))
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.size(1)))[0, len(prompt) - 1 : -1, :vocab_size]  # (k, V)
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens)[:, None]).mean().item()


def test_samples_end_at_stop_texts(tiny_code):
    model, tok = tiny_code
    kw = dict(num_samples=8, max_new_tokens=64, seed=0)
    full, _ = complete(model, tok, PROMPT, **kw)
    stopped = []
    for stop in (["\n"], ["return", "\n\n"]):
        cut, stats = complete(model, tok, PROMPT, stop=stop, **kw)
        reasons = [r["finish_reason"] for r in cut]
        assert "stop" in reasons
        for c, f in zip(cut, full):
            found = [f["text"].find(s) for s in stop if s in f["text"]]
            if c["finish_reason"] != "stop":  # no stop text in the whole sample: as without stop texts
                assert not found and c == f
                continue
            assert c["text"] == f["text"][: min(found)] and not any(s in c["text"] for s in stop)
            k = len(c["tokens"])
            assert c["tokens"] == f["tokens"][:k] and any(s in tok.continuation(tok.encode(PROMPT), c["tokens"])
                                                          for s in stop)
            stopped.append(c)
        if set(reasons) == {"stop"}:  # every sample stopped: the loop ended early, at a check
            assert stats["steps"] < kw["max_new_tokens"]
    for c in stopped:  # the mean log-prob of the tokens kept, the one that completes the stop text included
        assert c["mean_logprob"] == pytest.approx(mean_logprob(model, tok.vocab_size, tok.encode(PROMPT), c["tokens"]),
                                                  abs=1e-4)


def test_several_prompts_stop_as_each_alone(tiny_code):
    model, tok = tiny_code
    prompts, prefix, stop = ["def f(x):\n    ", "class A:\n    "], "import os\n", ["\n"]
    kw = dict(num_samples=3, max_new_tokens=24, seed=5, stop=stop)
    many, _ = complete_many(model, tok, prompts, prefix, **kw)
    assert any(r["finish_reason"] == "stop" for r in many)
    for p, prompt in enumerate(prompts):
        alone, _ = complete_many(model, tok, [tok.encode(prefix) + tok.encode(prompt, bos=False)], **kw)
        mine = [r for r in many if r["prompt_index"] == p]
        for a, m in zip(alone, mine):
            assert (a["tokens"], a["text"], a["finish_reason"]) == (m["tokens"], m["text"], m["finish_reason"])
            assert a["mean_logprob"] == pytest.approx(m["mean_logprob"], abs=1e-5)


def test_unescape():
    assert unescape(r"\ndef ") == "\ndef " and unescape(r"\t\\") == "\t\\"
    assert unescape("café 中 ") == "café 中 "
    with pytest.raises(ValueError, match="stop text"):
        unescape("\\x")


def test_cli_stop(tmp_path):
    out = tmp_path / "out.jsonl"
    proc = run_cli("--device=cpu", f"--prompt={PROMPT}", "--num_samples=4", "--max_new_tokens=32", "--seed=0", "--stop", r"\n",
                   "return", f"--output={out}")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["finish_reason"] for r in records} <= {"stop", "eos", "length"}
    assert any(r["finish_reason"] == "stop" for r in records)
    assert not any("\n" in r["text"] or "return" in r["text"] for r in records if r["finish_reason"] == "stop")


@pytest.mark.parametrize("args,expected", [
    (["--prompt=x", "--stop="], "non-empty"),
    (["--prompt=x", "--stop", "\\x"], "stop text"),
    (["--checkpoint_path=synthetic:tiny-gqa", "--prompt_len=4", "--stop=a"], "need a tokenizer"),
])
def test_cli_bad_stop_texts(args, expected):
    assert_one_line_error(run_cli("--device=cpu", "--max_new_tokens=2", *args), expected)
