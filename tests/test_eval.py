"""attendo eval: sliding-window perplexity against transformers' own loss on tiny random models;
ROUGE, exact match, regex and JSON checks against values worked out by hand; comparison runs
(models × adapters × generation settings) through the CLI, with JSON and CSV output; bad input."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import attendo
from attendo.cli import main
from attendo.train.evaluate import Checks, score
from attendo.train.lora import LoraSettings, add_lora, lora_layers, save_adapter
from attendo.train.perplexity import perplexity
from conftest import TOKENIZER_CORPUS, copy_model
from test_seq2seq import MAKERS

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from eval_perplexity import transformers_perplexity  # noqa: E402  (the reference: transformers' guide)

TEXT = "\n".join(TOKENIZER_CORPUS * 4)


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2"])
def test_perplexity_equals_transformers(tiny_model, kind):
    directory, reference = tiny_model(kind)
    model = attendo.load(directory)
    ids = torch.tensor(model.tokenizer.encode(TEXT))
    assert len(ids) > 200
    for window, stride in ((64, 24), (64, 64), (128, 100)):
        ours = perplexity(model, TEXT, window, stride)
        expected, _ = transformers_perplexity(reference, ids, window, stride)
        assert abs(ours.perplexity / expected - 1) < 1e-3, (window, stride)
        assert ours.tokens == len(ids) - 1 - (len(ids) - 1) // window * (stride == window)
    short = TOKENIZER_CORPUS[1]
    with torch.no_grad():
        loss = reference(torch.tensor([model.tokenizer.encode(short)]), labels=torch.tensor([model.tokenizer.encode(short)])).loss
    assert perplexity(model, short).perplexity == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_scores_worked_out_by_hand():
    references = ["the cat sat on the mat", '{"a": 1}', "Paris"]
    answers = ["the cat on the mat", '{"a": 1}', " Paris\n"]
    scores = score(answers, references, Checks(regex=re.compile(r"^\{"), json_valid=True))
    # rouge1 of the first: 5 of 5 answer words are in the reference, 5 of its 6 words are found.
    first = 2 * 1 * (5 / 6) / (1 + 5 / 6)
    assert scores["rouge1"] == pytest.approx((first + 1 + 1) / 3)
    # rouge2: bigrams "the cat", "cat on", "on the", "the mat": 3 of 4 in the reference's 5.
    # '{"a": 1}' is the words "a 1" (ROUGE keeps letters and digits); "Paris" has no bigram.
    second = 2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5)
    assert scores["rouge2"] == pytest.approx((second + 1 + 0) / 3)
    assert scores["rougeL"] == pytest.approx((first + 1 + 1) / 3)  # the answer is a subsequence
    assert scores["exact_match"] == pytest.approx(2 / 3)  # surrounding whitespace ignored
    assert scores["regex_match"] == pytest.approx(1 / 3)
    assert scores["json_valid"] == pytest.approx(1 / 3)  # "Paris" is not JSON


def test_cli_perplexity_json(tiny_model, tmp_path, capsys):
    directory = tiny_model("llama-gqa")[0]
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(TEXT[:300])
    (tmp_path / "texts" / "b.md").write_text(TEXT[300:])
    assert main(["eval", "--model", str(directory), "--perplexity", str(tmp_path / "texts"), "--window", "64", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = perplexity(attendo.load(directory), TEXT[:300] + "\n\n" + TEXT[300:], 64)
    assert printed == expected.to_dict()


def _data(tmp_path, model, prompts):
    """References that are the base model's own greedy answers: its exact match is 1."""
    answers = [r.text for r in model.generate(prompts, max_new_tokens=6, do_sample=False)]
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"prompt": p, "reference": a}) for p, a in zip(prompts, answers)]
    path.write_text("\n".join(lines[:-1]) + "\n\n" + lines[-1] + "\n")  # a blank line is skipped
    return path, answers


def test_cli_compares_models_adapters_and_settings(tiny_model, tmp_path, capsys):
    directory = tiny_model("llama-gqa")[0]
    base = attendo.load(directory)
    data, answers = _data(tmp_path, base, ["The capital of", "Hello", "def add(a, b):"])
    adapted = attendo.load(directory)
    add_lora(adapted, LoraSettings(rank=4, target_modules=("all-linear",)))
    with torch.no_grad():
        for _, layer in lora_layers(adapted.network):
            for part in layer.parts.values():
                part.B.normal_(0, 0.5)
    save_adapter(adapted, tmp_path / "lora")

    argv = ["eval", "--model", str(directory), "--adapter", "none", "--adapter", str(tmp_path / "lora"),
            "--data", str(data), "-n", "6", "--vary", "temperature=0,1.5", "--batch-size", "2"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "results.json")]) == 0
    table = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    names = [r["name"] for r in results["runs"]]
    assert names == ["base temperature=0.0", "base temperature=1.5", "+ lora temperature=0.0", "+ lora temperature=1.5"]
    assert all(name in table for name in ("exact", "rougeL", "eval of llama-gqa0: answers to 3 prompts", "+ lora temperature=1.5"))
    greedy, _, adapted_greedy, _ = results["runs"]
    assert [a["answer"] for a in greedy["answers"]] == answers
    assert greedy["metrics"]["exact_match"] == 1.0 and greedy["metrics"]["rouge1"] == 1.0
    assert greedy["metrics"]["examples"] == 3 and greedy["answers"][2]["line"] == 4
    assert [a["answer"] for a in adapted_greedy["answers"]] == [r.text for r in adapted.generate(
        [a["prompt"] for a in greedy["answers"]], max_new_tokens=6, do_sample=False)]  # fmt: skip
    assert adapted_greedy["metrics"]["exact_match"] < 1.0
    assert adapted_greedy["settings"]["adapter"] == str(tmp_path / "lora")

    assert main([*argv, "--out", str(tmp_path / "results.csv"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["name"] for r in rows] == names == [r["name"] for r in printed["runs"]]
    assert float(rows[0]["exact_match"]) == printed["runs"][0]["exact_match"] == 1.0
    assert rows[1]["temperature"] == "1.5" and rows[2]["adapter"] == str(tmp_path / "lora")


def test_runs_file_and_an_encoder_decoder(tmp_path_factory, tmp_path, capsys):
    directory = MAKERS["t5-v1.0"](tmp_path_factory)[0]
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "translate english to german : the house is big", "completion": "the house"}) + "\n")
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps([{"name": "greedy"}, {"name": "beams", "num_beams": 3}]))
    assert main(["eval", "-m", str(directory), "--data", str(data), "--runs", str(runs), "-n", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in printed["runs"]] == ["greedy", "beams"]
    assert all(0 <= r["rouge1"] <= 1 and r["examples"] == 1 for r in printed["runs"])


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "data.jsonl: no examples (the file is empty)"),
        (['{"prompt": "a", "reference": "b"}', '{"prompt": "a", "reference": '], "data.jsonl:2: not valid JSON"),
        (['{"prompt": "a"}'], 'data.jsonl:1: needs a "prompt" and a "reference"'),
        (['["a", "b"]'], "data.jsonl:1: expected a JSON object"),
        (['{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}'], "data.jsonl:1: the last message"),
    ],
)
def test_bad_data_files_exit_2(tiny_model, tmp_path, capsys, lines, message):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines))
    assert main(["eval", "-m", str(tiny_model("llama-gqa")[0]), "--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_bad_eval_input_exits_2(tiny_model, tmp_path, tmp_path_factory, capsys):
    llama = str(tiny_model("llama-gqa")[0])
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "one.txt").write_text("a")
    no_tokenizer = copy_model(tiny_model("llama-gqa")[0], tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    t5 = str(MAKERS["t5-v1.0"](tmp_path_factory)[0])
    capsys.readouterr()
    text = str(tmp_path / "one.txt")
    cases = [
        ([llama, "--perplexity", str(tmp_path / "empty.txt")], "empty.txt: no text to score"),
        ([llama, "--perplexity", text], "perplexity needs at least 2 tokens"),
        ([llama, "--perplexity", str(tmp_path / "missing")], "missing: no such file or folder"),
        ([str(no_tokenizer), "--perplexity", text], "no tokenizer.json"),
        ([t5, "--perplexity", text], "needs a decoder-only model"),
        ([llama, "--perplexity", text, "--window", "1000"], "window must be between 2 and the model's context length 128"),
        ([llama, "--perplexity", text, "--vary", "temprature=1"], "unknown setting 'temprature'"),
        ([llama, "--data", text, "--match-regex", "("], "not a valid regular expression"),
    ]
    for extra, message in cases:
        argv = ["eval", "-m", *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (extra, err)


def test_zero_one_few_shot_comparison_with_a_template(tiny_model, tmp_path, capsys):
    """--vary shots=0,1,2: each run's answers are what 13b's prompting API generates from the
    same template, examples and input."""
    from attendo.prompting.templates import PromptTemplate, choose_examples, complete, read_examples, render_prompt

    directory = tiny_model("llama-gqa")[0]
    (tmp_path / "task.jinja").write_text("Answer about {{ topic }}.")
    (tmp_path / "shots.jsonl").write_text(
        "\n".join(json.dumps({"input": i, "output": o}) for i, o in [("Hello", "world"), ("The capital", "Paris"), ("one", "two")])
    )
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "reference": "Tokyo"}) for p in ["The capital of Japan", "def add"]))
    argv = ["eval", "-m", str(directory), "--data", str(data), "--template", str(tmp_path / "task.jinja"),
            "--var", "topic=cities", "--examples", str(tmp_path / "shots.jsonl"), "--vary", "shots=0,1,2",
            "--completion", "-n", "5", "--out", str(tmp_path / "shots.json")]  # fmt: skip
    assert main(argv) == 0
    runs = json.loads((tmp_path / "shots.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["shots=0", "shots=1", "shots=2"]
    model = attendo.load(directory)
    template, pool = PromptTemplate.from_file(tmp_path / "task.jinja"), read_examples(tmp_path / "shots.jsonl")
    for shots, run in enumerate(runs):
        expected = []
        for prompt in ["The capital of Japan", "def add"]:
            rendered = render_prompt(model, template, {"topic": "cities"}, choose_examples(pool, shots), prompt, False, 5)
            expected.append(complete(model, rendered, max_new_tokens=5, do_sample=False).text)
        assert [a["answer"] for a in run["answers"]] == expected, shots

    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
    capsys.readouterr()
    assert main(argv) == 2
    assert 'data.jsonl:1: a conversation ("messages") cannot be laid out' in capsys.readouterr().err
    assert main(["eval", "-m", str(directory), "--data", str(data), "--shots", "2"]) == 2
    assert "--shots needs --examples" in capsys.readouterr().err
