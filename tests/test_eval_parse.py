# scripts/eval_parse.py: closing a sampled function and parsing it, picking held-out signatures,
# and the command line end to end on a tiny random checkpoint with a split.json of real stdlib files.
import json
import subprocess
import sys
import sysconfig
import tokenize
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tok_fixtures
from checkpoint import CHECKPOINT_FILE
from model import ModelArgs, Transformer
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from eval_parse import parses, pick_signatures  # noqa: E402

SIG = "def f(a, b=2):"
STDLIB = sysconfig.get_paths()["stdlib"]
REAL_FILES = ["textwrap.py", "shlex.py", "bisect.py"]


# ---------------------------------------------------------------------------------------------
# parses
def test_body_ending_at_dedented_line_parses():
    # what follows the function (here broken code) is not part of it
    completion = "    c = a + b\n\n    return c\n\n\nclass G(:\n    pass\n"
    assert parses(SIG, completion, finished=False)
    assert parses(SIG + "\n", completion, finished=True)  # the newline of the prompt may come along


def test_cut_mid_line_drops_the_last_line():
    completion = "    c = a + b\n    if c:\n        return c\n    return (a +"
    assert parses(SIG, completion, finished=False)
    assert not parses(SIG, completion, finished=True)  # kept, the cut line is a syntax error


def test_body_ending_exactly_at_eos_keeps_its_last_line():
    completion = "    c = a + b\n    return c"
    assert parses(SIG, completion, finished=True)
    assert parses(SIG, completion + "\n", finished=True)
    # cut by max_new_tokens instead, `return c` is dropped: what is left still parses
    assert parses(SIG, completion, finished=False)
    assert not parses(SIG, "    return c", finished=False)  # and nothing is left here


@pytest.mark.parametrize("completion", [
    "    c = = a\n    return c\n\ndef g():\n",
    "    c = a +\n    return c\n\n",
    "    c = a\n      return c\n\n",  # unexpected indent
    "    if a:\n    return b\n\n",  # expected an indented block
    "    return a\n  return b\n\n",  # dedent to no level
])
def test_syntax_error_fails(completion):
    assert not parses(SIG, completion, finished=True)


@pytest.mark.parametrize("completion", ["", "\n\n", "\n\ndef g():\n    return 1\n", "    # nothing yet\n\n"])
def test_empty_body_fails(completion):
    assert not parses(SIG, completion, finished=True)


def test_tabs_and_multiline_strings():
    assert parses(SIG, '\t"""Doc\n\tstring."""\n\treturn a\n', finished=True)
    assert not parses(SIG, '    """Doc\n    never closed\n', finished=True)


def test_pathological_text_fails_without_raising():
    assert not parses(SIG, "    c = '\0'\n    return c\n", finished=True)  # null byte
    assert not parses(SIG, "    c = " + "(" * 5000 + "\n", finished=True)
    # nesting too deep for the parser: MemoryError ("too complex to parse") or RecursionError
    assert not parses(SIG, "    c = " + "-" * 200_000 + "1\n", finished=True)


def test_real_stdlib_bodies_parse():
    # Independent reference: the functions' real source, followed by the rest of their file, is
    # valid Python, so closing it must give a body that parses.
    picked = pick_signatures(STDLIB, REAL_FILES, 3)
    assert len(picked) == 3
    for rel, line in picked:
        with tokenize.open(Path(STDLIB) / rel) as f:
            lines = f.read().split("\n")
        rest = "\n".join(lines[lines.index(line) + 1:])
        assert parses(line, rest, finished=True), rel
        assert parses(line, rest, finished=False), rel  # it ends at a column-0 line, nothing is dropped


# ---------------------------------------------------------------------------------------------
# pick_signatures
BODY = "    a = 1\n    b = 2\n    return a + b\n"
FAKE_FILES = {
    "a.py": (
        "import os\n\n"
        "@staticmethod\ndef decorated(x):\n" + BODY + "\n"
        "class C:\n    def method(self):\n" + BODY.replace("    ", "        ") + "\n"
        "def short(x):\n    return x\n\n"
        "def split_header(a,\n                 b):\n" + BODY + "\n"
        "def one_liner(x): return x\n\n"
        "def test_thing():\n" + BODY + "\n"
        "def _test_helper():\n" + BODY + "\n"
        "if True:\n    def nested():\n" + BODY.replace("    ", "        ") + "\n"
        "async def coroutine():\n" + BODY + "\n"
        "def wanted(x, y=1):  # a comment\n" + BODY + "\n"
        "def second(x):\n" + BODY
    ),
    # the name `wanted` is taken by a.py, so b.py gives its next function; a form feed line
    # (a page break, common in the stdlib) before it must not shift the line numbers
    "b.py": "\x0c\ndef wanted(q):\n" + BODY + "\x0c\n\ndef other(z) -> int:\n" + BODY,
    "c_broken.py": "def broken(:\n" + BODY,
    "d/e.py": "def inner(x):\n\n    a = x\n\n    return a\n",
    "f.py": "class OnlyAClass:\n    pass\n",
}


@pytest.fixture
def fake_stdlib(tmp_path) -> Path:
    for rel, text in FAKE_FILES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_pick_signatures(fake_stdlib):
    expected = [("a.py", "def wanted(x, y=1):  # a comment"), ("b.py", "def other(z) -> int:"),
                ("d/e.py", "def inner(x):")]
    assert pick_signatures(fake_stdlib, list(FAKE_FILES), 10) == expected
    # deterministic: the order the split lists the files in does not matter
    assert pick_signatures(str(fake_stdlib), list(reversed(FAKE_FILES)), 10) == expected
    assert pick_signatures(fake_stdlib, list(FAKE_FILES), 2) == expected[:2]
    assert pick_signatures(fake_stdlib, ["missing.py", "f.py", "c_broken.py", "d/e.py"], 5) == [expected[2]]


# ---------------------------------------------------------------------------------------------
# The command line on a tiny random checkpoint
def run_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/eval_parse.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_code")
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny-gqa"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / CHECKPOINT_FILE,
              metadata={"format": "pt", "config": model.config.to_json()})
    tok_fixtures.make_sentencepiece(root, vocab_size=model.config.vocab_size)
    split = dict(python="3.12.3", stdlib="/usr/lib/python3.12", train=["os.py"],
                 held_out=REAL_FILES + ["no_such_module_here.py"])
    (root / "split.json").write_text(json.dumps(split))
    return root


def test_continuation_keeps_leading_indentation(ckpt):
    tok = load_tokenizer(ckpt / "tokenizer.model")
    prompt, body = SIG + "\n", "    return a\n"
    ids = tok.encode(prompt + body, bos=True)
    n = len(tok.encode(prompt, bos=True))
    assert ids[:n] == tok.encode(prompt, bos=True)  # the prompt's ids are a prefix here
    assert tok.continuation(ids[:n], ids[n:]) == body


def test_end_to_end(ckpt, tmp_path):
    out = tmp_path / "parse.json"
    proc = run_eval(f"--checkpoint_path={ckpt}", "--num_samples=4", "--max_new_tokens=16", "--num_signatures=2",
                    "--top=2", "--seed=3", "--device=cpu", f"--output={out}")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "1 missing" in proc.stdout and "| **all** |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["settings"] | dict(num_samples=4, max_new_tokens=16, num_signatures=2, top=2, seed=3,
                                     skipped_missing=1) == report["settings"]
    sigs = report["signatures"]
    assert [s["file"] for s in sigs] == ["bisect.py", "shlex.py"]  # sorted order, one per file
    assert [s["seed"] for s in sigs] == [3, 4]
    for s in sigs:
        assert s["signature"].startswith("def ") and s["signature"] in proc.stdout
        assert [x["sample"] for x in s["samples"]] == [0, 1, 2, 3]
        for x in s["samples"]:
            assert x["parsed"] == parses(s["signature"], x["completion"], x["finish_reason"] == "eos")
            assert x["mean_logprob"] <= 0
        assert s["parsed"] == sum(x["parsed"] for x in s["samples"]) and s["parse_rate"] == s["parsed"] / 4
        top = sorted(s["samples"], key=lambda x: x["mean_logprob"], reverse=True)[:2]
        assert s["top_parsed"] == sum(x["parsed"] for x in top) and s["top_parse_rate"] == s["top_parsed"] / 2
    total = report["total"]
    assert total["samples"] == 8 and total["top_samples"] == 4
    assert total["parsed"] == sum(s["parsed"] for s in sigs) and total["parse_rate"] == total["parsed"] / 8
    assert total["top_parsed"] == sum(s["top_parsed"] for s in sigs)


@pytest.mark.parametrize("case", ["missing_checkpoint", "missing_split"])
def test_user_errors_are_one_line(case, ckpt, tmp_path):
    if case == "missing_checkpoint":
        path, expected = tmp_path / "nowhere", "checkpoint not found"
    else:
        path, expected = tmp_path / "no_split", "split.json not found"
        path.mkdir()
        (path / CHECKPOINT_FILE).write_bytes((ckpt / CHECKPOINT_FILE).read_bytes())
    proc = run_eval(f"--checkpoint_path={path}", "--device=cpu", f"--output={tmp_path / 'out.json'}")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert not (tmp_path / "out.json").exists()
