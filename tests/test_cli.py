"""The attendo command, in process through cli.main and once as a real program."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from attendo.cli import main

ATTENDO = Path(sys.executable).parent / "attendo"


def greedy(model, prompt: str, n: int = 5) -> str:
    return model.generate(prompt, max_new_tokens=n, do_sample=False).text


def test_generate_greedy(tiny_llama_dir, tiny_llama, capsys):
    assert main(["generate", "Hello", "-m", str(tiny_llama_dir), "--greedy", "-n", "5"]) == 0
    out, err = capsys.readouterr()
    assert out == greedy(tiny_llama, "Hello") + "\n"
    assert err == ""


def test_generate_reads_the_prompt_from_stdin(tiny_llama_dir, tiny_llama, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("The quick brown fox"))
    assert main(["generate", "-m", str(tiny_llama_dir), "--greedy", "-n", "4"]) == 0
    assert capsys.readouterr().out == greedy(tiny_llama, "The quick brown fox", 4) + "\n"



def test_generate_takes_every_sampling_setting_of_the_api(tiny_llama_dir, tiny_llama, capsys):
    """The same sampling flags as attendo distribution, the penalties included."""
    flags = ["--temperature", "0.9", "--top-k", "20", "--top-p", "0.8", "--min-p", "0.01", "--repetition-penalty", "1.2",
             "--presence-penalty", "0.5", "--frequency-penalty", "0.3", "--seed", "7"]  # fmt: skip
    assert main(["generate", "Hello", "-m", str(tiny_llama_dir), "-n", "8", *flags]) == 0
    expected = tiny_llama.generate("Hello", max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.8, min_p=0.01,
                                   repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3, seed=7)  # fmt: skip
    assert capsys.readouterr().out == expected.text + "\n"

@pytest.fixture
def pickle_file(tmp_path) -> Path:
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x04K\x01.")  # a pickled 1 (test_loading_errors checks nothing is unpickled)
    return path


@pytest.mark.parametrize(
    "arguments",
    [
        ["-m", "{missing}"],
        ["-m", "{pickle}"],
        ["-m", "{tiny}", "--temperature", "-1", "-n", "5"],
        ["-m", "{tiny}", "--top-p", "1.5", "-n", "5"],
        ["-m", "{tiny}", "-n", "100000"],
        ["-m", "{tiny}", "--dtype", "int3"],
    ],
    ids=["missing-model", "pickle", "negative-temperature", "top-p-above-1", "beyond-context", "unknown-dtype"],
)
def test_errors_are_one_line_and_exit_code_2(arguments, tiny_llama_dir, pickle_file, tmp_path, capsys):
    paths = {"missing": tmp_path / "nothing-here", "pickle": pickle_file, "tiny": tiny_llama_dir}
    argv = ["generate", "Hello"] + [a.format(**paths) for a in arguments]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("attendo: error: ")
    assert err.count("\n") == 1 and err.endswith("\n")
    assert "Traceback" not in err


def test_dtype_picks_how_a_gguf_file_is_held(tmp_path, capsys):
    """By default a GGUF file's Q4_1 matrices stay blocks; --dtype float32 dequantizes them."""
    import attendo
    from attendo.optimize import BlockLinear
    from test_gguf_reader import byte_level_vocab, hf_llama, write_gguf
    from gguf import GGMLQuantizationType as Q

    tokens, _, _ = byte_level_vocab()
    path = write_gguf(tmp_path / "tiny.gguf", hf_llama(len(tokens)), qtype=Q.Q4_1)
    for dtype in (None, "float32"):
        model = attendo.load(path, dtype=dtype)
        assert any(isinstance(m, BlockLinear) for m in model.network.modules()) == (dtype is None)
        assert main(["generate", "Hello", "-m", str(path), "--greedy", "-n", "5", *(["--dtype", dtype] if dtype else [])]) == 0
        assert capsys.readouterr().out == greedy(model, "Hello") + "\n"


def test_tokenize_prints_the_ids(tiny_llama_dir, tiny_llama, capsys):
    ids = tiny_llama.tokenizer.encode("Hello world")
    assert main(["tokenize", "Hello world", "-m", str(tiny_llama_dir), "--json"]) == 0
    assert [t["id"] for t in json.loads(capsys.readouterr().out)] == ids
    assert main(["tokenize", "Hello world", "-m", str(tiny_llama_dir)]) == 0
    table = capsys.readouterr().out
    assert f"{len(ids)} tokens" in table
    rows = [line for line in table.splitlines() if "'" in line]  # each token row shows repr(token)
    assert [int(row.strip(" │").split("│")[-1]) for row in rows] == ids


def test_models_lists_the_bundled_model(capsys):
    assert main(["models"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


def test_info_describes_a_model_directory(tiny_llama_dir, capsys):
    assert main(["info", str(tiny_llama_dir)]) == 0
    out = capsys.readouterr().out
    assert "4 query, 2 key/value" in out
    assert "grouped-query" in out


def test_chat_with_reset_and_quit(tiny_llama_dir, tiny_llama, capsys, monkeypatch):
    lines = iter(["Hello", "", "/reset", "Hi there!", "/quit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "-m", str(tiny_llama_dir), "--greedy", "-n", "5"]) == 0
    out = capsys.readouterr().out

    def reply(text):  # after /reset, the conversation is the new message alone
        return tiny_llama.chat([{"role": "user", "content": text}], max_new_tokens=5, do_sample=False).text

    assert out == f"assistant> {reply('Hello')}\n(conversation cleared)\nassistant> {reply('Hi there!')}\n"
    assert next(lines) == "never read"


def test_the_installed_program(tiny_llama_dir, tiny_llama):
    def attendo(*arguments):
        return subprocess.run([ATTENDO, *arguments], capture_output=True, text=True, timeout=120)

    done = attendo("generate", "Hello", "-m", str(tiny_llama_dir), "--greedy", "-n", "5")
    assert (done.returncode, done.stdout, done.stderr) == (0, greedy(tiny_llama, "Hello") + "\n", "")
    failed = attendo("generate", "Hello", "-m", str(tiny_llama_dir), "--top-p", "0")
    assert failed.returncode == 2
    assert failed.stderr.startswith("attendo: error: ") and failed.stderr.count("\n") == 1
