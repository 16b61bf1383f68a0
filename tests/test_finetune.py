"""attendo finetune on tiny random checkpoints: only completion / assistant tokens take loss (the
first step's loss equals transformers' masked cross-entropy on the same batch), full fine-tuning
writes a model directory transformers loads with equal logits, LoRA trains only adapter weights
and writes a PEFT adapter (or, with --merge, a whole model), an encoder-decoder learns input →
target, and malformed data is a one-line error naming the file and line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import attendo
from attendo.cli import main
from attendo.train.data import IGNORE, PaddedExamples
from attendo.train.examples import ExampleMaker, read_records
from attendo.train.finetune import finetune
from attendo.train.lora import LoraSettings
from attendo.train.report import read_log
from attendo.train.settings import TrainSettings
from tiny_families import jitter, save, word_tokenizer

transformers = pytest.importorskip("transformers")

PAIRS = [
    ("The capital of France is", " Paris, said the quick brown fox."),
    ("def add(a, b):", "\n    return a + b"),
]
CONVERSATION = [
    {"role": "user", "content": "Hello world!"},
    {"role": "assistant", "content": "The quick brown fox."},
    {"role": "user", "content": "for i in range(10):"},
    {"role": "assistant", "content": "continue"},
]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _data(tmp_path, copies=4):
    records = [{"prompt": p, "completion": c} for p, c in PAIRS] * copies + [{"messages": CONVERSATION}]
    return _jsonl(tmp_path / "train.jsonl", records)


def _settings(**changes) -> TrainSettings:
    base = TrainSettings(steps=30, batch_size=9, lr=1e-2, warmup_steps=2, eval_every=100, save_every=100, precision="float32")
    return base.replace(**changes)


def test_only_answer_tokens_take_loss(tiny_llama, tmp_path):
    tokenizer = tiny_llama.tokenizer
    eos = tokenizer.token_to_id(tokenizer.eos_token)
    maker = ExampleMaker(tokenizer, eos, seq2seq=False, chat=False)
    records = read_records(_data(tmp_path, copies=1))
    prompt, completion = PAIRS[0]
    example = maker(records[0])
    learned = [i for i, t in zip(example.ids, example.targets) if t]
    assert learned == tokenizer.encode(completion, add_special_tokens=False) + [eos]
    assert example.ids[: len(example.ids) - len(learned)] == tokenizer.encode(prompt)

    chat = maker(records[-1])
    learned = tokenizer.decode([i for i, t in zip(chat.ids, chat.targets) if t], skip_special_tokens=False)
    assert learned == "The quick brown fox.<|im_end|>\ncontinue<|im_end|>\n"  # the assistant turns as rendered
    rendered = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert tokenizer.decode(chat.ids, skip_special_tokens=False) == rendered

    batch = PaddedExamples([example, chat], pad_id=0).batch([0, 1])
    assert batch["labels"][0, : len(tokenizer.encode(prompt)) - 1].eq(IGNORE).all()
    assert batch["labels"][0, len(example.ids) - 1 :].eq(IGNORE).all()  # the padding


def _first_batch_loss(model, data, logits) -> float:
    """The mean cross-entropy over the answer tokens of every example in data, one batch."""
    eos = model.tokenizer.token_to_id(model.tokenizer.eos_token)
    maker = ExampleMaker(model.tokenizer, eos, seq2seq=False, chat=False)
    examples = [maker(r) for r in read_records(data)]
    batch = PaddedExamples(examples, pad_id=0).batch(list(range(len(examples))))
    with torch.no_grad():
        values = logits(batch["tokens"])
    return float(torch.nn.functional.cross_entropy(values.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE))


def _same_logits_in_transformers(out, model) -> None:
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([model.tokenizer.encode(PAIRS[1][0])])
    assert transformers.AutoTokenizer.from_pretrained(out)(PAIRS[1][0]).input_ids == ids[0].tolist()
    with torch.no_grad():
        expected = reloaded(ids).logits
        # Float32 rounding of logits this large (a few tens): transformers' own float32 result is
        # itself ~2.5e-4 from the float64 one here, so the bound scales with the logits.
        torch.testing.assert_close(model.logits(ids), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_full_finetuning_learns_the_answers_and_saves_a_model(tiny_model, tmp_path):
    directory, reference = tiny_model("llama-gqa")
    data, out = _data(tmp_path), tmp_path / "tuned"
    finetune(data, str(directory), out, _settings())
    log = read_log(out)
    # The first step's loss (weights untouched) is transformers' masked cross-entropy, per token.
    expected = _first_batch_loss(attendo.load(directory), data, lambda ids: reference(ids).logits)
    assert log[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert log[-1]["loss"] < 0.1 * log[0]["loss"]

    tuned = attendo.load(out)
    for prompt, completion in PAIRS:
        assert tuned.generate(prompt, max_new_tokens=40, do_sample=False).text == completion  # stops at EOS
    _same_logits_in_transformers(out, tuned)


def test_a_gguf_file_trains_dequantized_and_saves_as_a_model_directory(tmp_path):
    from gguf import GGMLQuantizationType as Q

    from test_gguf_reader import byte_level_vocab, hf_llama, write_gguf

    path = write_gguf(tmp_path / "tiny.gguf", hf_llama(len(byte_level_vocab()[0]), seed=1), qtype=Q.Q8_0)
    data, out = _data(tmp_path), tmp_path / "from-gguf"
    finetune(data, str(path), out, _settings(steps=3, lr=1e-4))
    start = attendo.load(path, dtype="float32")  # the file's Q8_0 blocks, dequantized
    assert read_log(out)[0]["loss"] == pytest.approx(_first_batch_loss(start, data, start.network), rel=1e-5)
    _same_logits_in_transformers(out, attendo.load(out))


def test_lora_trains_only_the_adapter(tiny_model, tmp_path):
    directory, _ = tiny_model("llama-gqa")
    data, out = _data(tmp_path), tmp_path / "adapter"
    lora = LoraSettings(rank=8, alpha=16, target_modules="q_proj,v_proj,up_proj,down_proj")
    finetune(data, str(directory), out, _settings(steps=30, lr=2e-2), lora=lora)
    log = read_log(out)
    assert log[-1]["loss"] < 0.6 * log[0]["loss"]  # low-rank updates of a random network learn slowly
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    adapter = load_file(out / "adapter_model.safetensors")
    assert {k.split(".")[-3] for k in adapter} == {"q_proj", "v_proj", "up_proj", "down_proj"}
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B started at zero

    trained_weights = load_file(sorted((out / "checkpoints").glob("step-*"))[-1] / "weights.safetensors")
    assert trained_weights and all(".parts." in name for name in trained_weights)  # nothing else trained

    base = attendo.load(directory)
    adapted = attendo.load(directory, adapter=out)
    ids = torch.tensor([base.tokenizer.encode(PAIRS[0][0])])
    assert not torch.allclose(base.logits(ids), adapted.logits(ids))

    merged_out = tmp_path / "merged"  # the same run again (seeded), its adapter folded in
    finetune(data, str(directory), merged_out, _settings(steps=30, lr=2e-2), lora=lora, merge=True)
    merged = attendo.load(merged_out)
    assert float((merged.logits(ids) - adapted.logits(ids)).abs().max()) < 1e-4


def test_an_encoder_decoder_learns_input_to_target(tmp_path):
    tokenizer = word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>")
    config = transformers.T5Config(
        vocab_size=tokenizer.get_vocab_size(), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    directory = save(jitter(transformers.T5ForConditionalGeneration(config)), tokenizer, tmp_path / "t5")
    pairs = [("translate english to german : the house is big", "the city is old"), ("the cat", "a small dog")]
    data = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in pairs] * 4)
    out = tmp_path / "t5-tuned"
    finetune(data, str(directory), out, _settings(steps=40, batch_size=8, lr=1e-2))
    log = read_log(out)
    assert log[-1]["loss"] < 0.1 * log[0]["loss"]
    tuned = attendo.load(out)
    for prompt, completion in pairs:
        assert tuned.generate(prompt, max_new_tokens=8, do_sample=False).text.strip() == completion


@pytest.mark.parametrize(
    "lines, flags, message",
    [
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": '], [], "bad.jsonl:2: not valid JSON"),
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'], [], 'bad.jsonl:2: expected {"prompt"'),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], [], "bad.jsonl:1: the conversation has no assistant"),
        (['{"messages": [{"role": "robot", "content": "hi"}]}'], [], "bad.jsonl:1: message 1 has role 'robot'"),
        ([], [], "bad.jsonl: no examples"),
        (['{"prompt": "a", "completion": "b"}'], ["--lr", "0"], "--lr must be above 0"),
        (['{"prompt": "a", "completion": "b"}'], ["--lora", "--target-modules", "nope"], "unknown LoRA target module 'nope'"),
        (['{"prompt": "a", "completion": "b"}'], ["--rank", "4"], "--rank sets up LoRA: add --lora"),
    ],
)
def test_bad_input_is_a_one_line_error(tiny_llama_dir, tmp_path, capsys, lines, flags, message):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    code = main(["finetune", str(data), "--model", str(tiny_llama_dir), "--out", str(tmp_path / "out"), "--steps", "1", *flags])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert error.startswith("attendo: error:") and message in error and "\n" not in error
