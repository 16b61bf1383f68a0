"""attendo train: a tiny model learns a toy corpus by heart and then generates it; resuming after
Ctrl-C (or a crash while a checkpoint is written) continues bit for bit as if never stopped; the
output directory loads in transformers with the same logits; bad input is a one-line error."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import attendo
from attendo.cli import main
from attendo.train import checkpoint
from attendo.train.data import GlobalOrder, PackedTokens, shard
from attendo.train.pretrain import pretrain
from attendo.train.report import read_log
from attendo.train.settings import TrainSettings, learning_rate

TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128}
SENTENCES = [
    "attendo learns to repeat this sentence word for word.",
    "a second line keeps the model honest about what comes next.",
]


def _corpus(folder: Path, copies: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": SENTENCES[i % 2]}) for i in range(copies)]
    (folder / "sentences.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "notes.md").write_text("# notes\n\n" + " ".join(SENTENCES) + "\n")
    return folder


def _train(data: Path, out: Path, steps: int, resume: bool = False, **changes) -> object:
    settings = TrainSettings(
        steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=5, save_every=4, precision="float32", seed=1
    ).replace(**changes)
    return pretrain([data], out, settings, overrides=TINY, seq_len=32, vocab_size=300, eval_fraction=0.1, resume=resume)


def test_a_tiny_model_memorises_its_corpus_and_generates_it(tmp_path):
    data = _corpus(tmp_path / "data")
    out = tmp_path / "model"
    outcome = _train(data, out, steps=120, eval_every=40, save_every=1000)
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 121))
    assert all({"step", "loss", "lr", "tokens"} <= set(r) for r in log)
    assert [r["step"] for r in log if "eval_loss" in r] == [40, 80, 120]
    assert log[-1]["loss"] < 0.2 < 4.0 < log[0]["loss"]  # ln(300) = 5.7 at the start
    assert outcome.eval_loss < 0.3 and log[-1]["tokens"] == 120 * 8 * 32
    assert (out / "loss.png").stat().st_size > 10_000
    assert main(["loss-curve", str(out), "--output", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 10_000

    model = attendo.load(out)  # the output folder as it is
    for sentence in SENTENCES:
        prompt = " ".join(sentence.split()[:3])  # whole words: as the text was tokenized in training
        rest = sentence[len(prompt) :]
        assert model.generate(prompt, max_new_tokens=24, do_sample=False).text == rest


def test_output_loads_in_transformers_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    data = _corpus(tmp_path / "data", copies=10)
    for preset in ("llama-mini", "gpt2-mini"):
        out = tmp_path / preset
        settings = TrainSettings(steps=3, batch_size=4, eval_every=10, precision="float32")
        shape = {"dim": 64, "n_layers": 2, "n_heads": 4} | ({"n_kv_heads": 2} if preset == "llama-mini" else {})
        pretrain([data], out, settings, preset_name=preset, overrides=shape, seq_len=32, vocab_size=300)
        reference = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        ours = attendo.load(out)
        ids = tokenizer(SENTENCES[1], return_tensors="pt").input_ids
        assert ids[0].tolist() == ours.tokenizer.encode(SENTENCES[1])
        with torch.no_grad():
            expected = reference(ids).logits
        assert float((ours.logits(ids) - expected).abs().max()) < 1e-4
        assert reference.config.model_type == ("llama" if preset == "llama-mini" else "gpt2")


def _losses(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["tokens"], r.get("eval_loss")) for r in read_log(out)]


def test_resume_after_ctrl_c_continues_bit_for_bit(tmp_path):
    data = _corpus(tmp_path / "data")
    straight = tmp_path / "straight"
    _train(data, straight, steps=12)

    stopped = tmp_path / "stopped"

    def press_ctrl_c() -> None:
        while len(read_log(stopped)) < 3:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    outcome = _train(data, stopped, steps=12)
    assert outcome.interrupted and 3 <= outcome.steps < 12
    assert checkpoint.latest_checkpoint(stopped).name == f"step-{outcome.steps:07d}"
    assert attendo.load(stopped).config.n_layers == 2  # the model was written on the way out

    with pytest.raises(attendo.CheckpointError, match="--resume"):
        _train(data, stopped, steps=12)
    with pytest.raises(attendo.CheckpointError, match="lr"):
        _train(data, stopped, steps=12, resume=True, lr=1e-3)
    _train(data, stopped, steps=12, resume=True)
    assert _losses(stopped) == _losses(straight)
    assert load_file(stopped / "model.safetensors").keys() == load_file(straight / "model.safetensors").keys()
    for name, value in load_file(stopped / "model.safetensors").items():
        assert torch.equal(value, load_file(straight / "model.safetensors")[name]), name


def test_a_crash_while_writing_a_checkpoint_leaves_the_last_one_whole(tmp_path, monkeypatch):
    data = _corpus(tmp_path / "data")
    out = tmp_path / "run"
    real_rename = os.rename

    def crash_on_the_second_checkpoint(source, target):
        if str(target).endswith("step-0000008"):
            raise OSError("disk pulled out")
        real_rename(source, target)

    monkeypatch.setattr(checkpoint.os, "rename", crash_on_the_second_checkpoint)
    with pytest.raises(OSError, match="disk pulled out"):
        _train(data, out, steps=12)
    monkeypatch.setattr(checkpoint.os, "rename", real_rename)
    assert checkpoint.latest_checkpoint(out).name == "step-0000004"
    assert list((out / "checkpoints").glob(".step-0000008.tmp-*"))  # the half-written one

    straight = tmp_path / "straight"
    _train(data, straight, steps=12)
    _train(data, out, steps=12, resume=True)
    assert not list((out / "checkpoints").glob(".*tmp*"))
    assert _losses(out) == _losses(straight)


def test_the_data_order_depends_on_the_step_only():
    order = GlobalOrder(rows=10, batch_size=4, seed=3)
    epoch = order.step(0) + order.step(1) + order.step(2)[:2]
    assert sorted(epoch) == list(range(10))  # each row once per epoch
    assert GlobalOrder(10, 4, 3).step(2) == order.step(2)  # no hidden state: resumable anywhere
    assert shard([5, 6, 7, 8], rank=1, world_size=2, micro_batch=1) == [[7], [8]]
    rows = PackedTokens(torch.arange(10), length=3)
    assert len(rows) == 3
    batch = rows.batch([2])
    assert batch["tokens"].tolist() == [[6, 7, 8]] and batch["labels"].tolist() == [[7, 8, 9]]


def test_the_learning_rate_warms_up_then_decays_to_its_floor():
    settings = TrainSettings(steps=100, lr=1e-3, warmup_steps=10)
    rates = [learning_rate(s, settings) for s in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert rates[-1] == pytest.approx(1e-4, rel=0.01)  # min_lr defaults to lr / 10


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["train", *args])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "make, flags, message",
    [
        (lambda d: (d / "empty.txt").write_text("  \n"), [], "holds no text"),
        (lambda d: (d / "short.txt").write_text("too short"), [], "too short for one sequence"),
        (lambda d: (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n'), [], "bad.jsonl:2: not valid JSON"),
        (lambda d: (d / "a.txt").write_text("text " * 200), ["--lr", "0"], "--lr must be above 0"),
        (lambda d: (d / "a.txt").write_text("text " * 200), ["--lr=-1e-3"], "--lr must be above 0"),
        (lambda d: (d / "a.txt").write_text("text " * 200), ["--preset", "no-such-model"], "no preset 'no-such-model'"),
        (lambda d: (d / "a.csv").write_text("x"), [], "unsupported file type"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, make, flags, message):
    data = tmp_path / "data"
    data.mkdir()
    make(data)
    files = [str(p) for p in data.iterdir()]
    code, error = _cli(capsys, *files, "--out", str(tmp_path / "out"), "--seq-len", "64", "--steps", "1", *flags)
    assert code == 2
    assert error.startswith("attendo: error:") and message in error and "\n" not in error


def test_a_compiled_step_trains_as_the_eager_one(tmp_path):
    """--compile takes other kernels (the written-out attention products among them); the losses
    of every step, and so the weights after each, stay those of the eager step."""
    data = _corpus(tmp_path / "data")
    _train(data, tmp_path / "eager", steps=4, eval_every=100)
    _train(data, tmp_path / "compiled", steps=4, eval_every=100, compile=True)
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [1, 2, 3, 4]
    for mine, reference in zip(compiled, eager):
        assert mine["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert compiled[-1]["loss"] < compiled[0]["loss"]
