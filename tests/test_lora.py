"""LoRA adapters against the `peft` library, both ways, on tiny random checkpoints of LLaMA (GQA),
Qwen2, GPT-2 (Conv1D, stored transposed), BLOOM (per-head fused q/k/v), T5, BART, Phi-3 (q/k/v and
gate/up fused in the checkpoint) and Gemma 3 (PEFT's default targets): an adapter
attendo saves loads with peft onto the transformers model with the same logits, and an adapter
peft makes (random non-zero B) loads in attendo with the same logits. Then merging, training only
the adapter, adapters beside quantized weights, and bad adapters."""

from __future__ import annotations

import json

import pytest
import torch

import attendo
from attendo.errors import AdapterError
from attendo.train.lora import LoraSettings, add_lora, lora_layers, merge_lora, save_adapter, target_names
from test_seq2seq import MAKERS
from tiny_families import SENTENCES, jitter, max_diff, save, word_tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _bloom(tmp_path_factory):
    tokenizer = word_tokenizer(["<unk>", "<s>", "</s>", "<pad>"])
    config = transformers.BloomConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=48, n_layer=2, n_head=6)
    torch.manual_seed(0)
    reference = jitter(transformers.BloomForCausalLM(config), seed=7)
    return save(reference, tokenizer, tmp_path_factory.mktemp("bloom")), reference


# family: (targets as PEFT takes them, how the tiny checkpoint is made)
FAMILIES = {
    "llama-gqa": ("all-linear", None),
    "qwen2": (["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], None),
    "gpt2": (["c_attn", "c_proj", "c_fc"], None),
    "bloom": ("all-linear", _bloom),
    "t5": (["q", "k", "v", "o", "wi", "wo"], MAKERS["t5-v1.0"]),
    "bart": ("all-linear", MAKERS["bart"]),
    "phi3-longrope": (["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], None),  # q/k/v and gate/up fused in the file
    "gemma3": (None, None),  # None: PEFT's default targets for the model type
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_model, tmp_path_factory):
    """(name, checkpoint directory, targets)."""
    targets, maker = FAMILIES[request.param]
    directory = maker(tmp_path_factory)[0] if maker else tiny_model(request.param)[0]
    return request.param, directory, targets


def _reference(directory):
    """A fresh transformers model (peft changes the model it wraps)."""
    config = transformers.AutoConfig.from_pretrained(directory)
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    return auto.from_pretrained(directory, attn_implementation="eager").eval()


def _inputs(model) -> dict[str, torch.Tensor]:
    ids = torch.tensor([model.tokenizer.encode(SENTENCES[2])])
    if model.config.family == "encoder-decoder":
        return {"input_ids": ids, "decoder_input_ids": torch.tensor([[model.decoder_start_token_id, 7, 12, 30, 9]])}
    return {"input_ids": ids}


def _attendo_logits(model, inputs) -> torch.Tensor:
    if "decoder_input_ids" in inputs:
        return model.logits(inputs["input_ids"], decoder_token_ids=inputs["decoder_input_ids"])
    return model.logits(inputs["input_ids"])


def _reference_logits(reference, inputs) -> torch.Tensor:
    with torch.no_grad():
        return reference(**inputs).logits


def _randomize_adapter(model, seed: int = 0) -> None:
    """B starts at zero (the model unchanged); give every adapter weight a value that counts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model.network):
            for part in layer.parts.values():
                part.A.copy_(torch.randn(part.A.shape, generator=generator) * 0.3)
                part.B.copy_(torch.randn(part.B.shape, generator=generator) * 0.3)


def _targets(targets) -> tuple[str, ...] | None:
    return None if targets is None else (targets,) if isinstance(targets, str) else tuple(targets)


def test_attendo_adapter_loads_in_peft_with_the_same_logits(family, tmp_path):
    name, directory, targets = family
    model = attendo.load(directory)
    add_lora(model, LoraSettings(rank=4, alpha=8, target_modules=_targets(targets)))
    _randomize_adapter(model)
    adapter = save_adapter(model, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8

    reference = _reference(directory)
    inputs = _inputs(model)
    base_logits = _reference_logits(reference, inputs)
    adapted = peft.PeftModel.from_pretrained(reference, adapter).eval()
    expected = _reference_logits(adapted, inputs)
    ours = _attendo_logits(model, inputs)
    assert max_diff(expected, base_logits) > 1e-2, "the adapter should change the logits"
    assert max_diff(ours, expected) < 1e-4


def test_peft_adapter_loads_in_attendo_with_the_same_logits(family, tmp_path):
    name, directory, targets = family
    reference = _reference(directory)
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False, fan_in_fan_out=name == "gpt2"
    )  # init_lora_weights=False: B random, not zero
    torch.manual_seed(1)
    adapted = peft.get_peft_model(reference, config).eval()
    adapted.save_pretrained(tmp_path / "peft-adapter")

    model = attendo.load(directory, adapter=tmp_path / "peft-adapter")
    inputs = _inputs(model)
    assert max_diff(_attendo_logits(model, inputs), _reference_logits(adapted, inputs)) < 1e-4
    base = attendo.load(directory)
    assert max_diff(_attendo_logits(model, inputs), _attendo_logits(base, inputs)) > 1e-2


def test_merge_gives_the_same_outputs(tiny_model):
    directory = tiny_model("llama-gqa")[0]
    model = attendo.load(directory)
    add_lora(model, LoraSettings(rank=4, alpha=8, target_modules=("all-linear",)))
    _randomize_adapter(model, seed=2)
    ids = torch.tensor([model.tokenizer.encode(SENTENCES[0])])
    unmerged = model.logits(ids)
    text = model.generate(SENTENCES[0], max_new_tokens=8, do_sample=False).text
    merge_lora(model)
    assert not lora_layers(model.network)
    assert all(type(m) is torch.nn.Linear for n, m in model.network.named_modules() if n.endswith((".qkv", ".up", ".down", ".out")))
    assert max_diff(model.logits(ids), unmerged) < 1e-4
    assert model.generate(SENTENCES[0], max_new_tokens=8, do_sample=False).text == text
    assert max_diff(model.logits(ids), attendo.load(directory).logits(ids)) > 1e-2


def test_only_adapter_weights_train(tiny_model):
    model = attendo.load(tiny_model("llama-gqa")[0])
    trainable = add_lora(model, LoraSettings(rank=2, alpha=4, target_modules=("q_proj", "v_proj", "down_proj")))
    # q and v are parts of the fused qkv layer; down is a layer of its own.
    assert sorted(trainable) == sorted(
        f"blocks.{i}.{layer}.parts.{part}.{ab}"
        for i in range(2)
        for layer, part in (("attn.qkv", "q_proj"), ("attn.qkv", "v_proj"), ("mlp.down", "down_proj"))
        for ab in "AB"
    )
    frozen = {n: p.detach().clone() for n, p in model.network.named_parameters() if not p.requires_grad}
    network = model.network.train()
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([model.tokenizer.encode(SENTENCES[1])])
    losses = []
    for _ in range(5):
        logits = network(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, parameter in network.named_parameters():
        if name in frozen:
            assert parameter.grad is None and torch.equal(parameter, frozen[name]), name


def test_adapter_runs_beside_quantized_weights(tiny_model, tmp_path):
    """On int8 (Q8_0 block) weights the adapter adds exactly its own update and merging refuses."""
    directory = tiny_model("llama-gqa")[0]
    model = attendo.load(directory)
    add_lora(model, LoraSettings(rank=4, target_modules=("q_proj", "gate_proj")))
    _randomize_adapter(model, seed=3)
    save_adapter(model, tmp_path / "adapter")
    quantized = attendo.load(directory, dtype="int8", adapter=tmp_path / "adapter")
    layer = quantized.network.blocks[0].attn.qkv
    assert type(layer.base).__name__ == "BlockLinear"
    x = torch.randn(3, quantized.config.dim)
    part = layer.parts["q_proj"]
    expected = layer.base(x)
    expected[:, part.rows] += x @ part.A.t() @ part.B.t() * part.scale
    with torch.no_grad():
        assert max_diff(layer(x), expected) < 1e-5
    with pytest.raises(AdapterError, match="dtype='float32' to merge"):
        merge_lora(quantized)


def test_unknown_target_module_names_the_valid_ones(tiny_model):
    model = attendo.load(tiny_model("llama-gqa")[0])
    with pytest.raises(AdapterError, match=r"unknown LoRA target module 'qkv_proj'.*valid: down_proj, gate_proj, k_proj"):
        add_lora(model, LoraSettings(target_modules=("q_proj", "qkv_proj")))
    assert "c_attn" in target_names(attendo.load(tiny_model("gpt2")[0]))
    assert not lora_layers(model.network)


def test_bad_adapter_directories(tiny_model, tmp_path):
    llama = tiny_model("llama-gqa")[0]
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        attendo.load(llama, adapter=tmp_path)
    with pytest.raises(AdapterError, match="no such adapter directory"):
        attendo.load(llama, adapter=tmp_path / "missing")

    # An adapter made for a model with 4 key/value heads does not fit one with 2.
    other = attendo.load(tiny_model("llama-tied")[0])
    add_lora(other, LoraSettings(rank=2, target_modules=("k_proj",)))
    save_adapter(other, tmp_path / "tied")
    with pytest.raises(AdapterError, match=r"k_proj are A \[2, 64\] and B \[64, 2\].*needs A \[rank, 64\] and B \[32, rank\]"):
        attendo.load(llama, adapter=tmp_path / "tied")

    gpt2 = attendo.load(tiny_model("gpt2")[0])
    add_lora(gpt2, LoraSettings(rank=2, target_modules=("c_attn",)))
    save_adapter(gpt2, tmp_path / "gpt2")
    with pytest.raises(AdapterError, match="LoRA weights for transformer.h.0.attn.c_attn, which this llama model does not have"):
        attendo.load(llama, adapter=tmp_path / "gpt2")

    config = json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())
    (tmp_path / "gpt2" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        attendo.load(tiny_model("gpt2")[0], adapter=tmp_path / "gpt2")

    (tmp_path / "gpt2" / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "gpt2" / "adapter_model.safetensors").rename(tmp_path / "gpt2" / "adapter_model.bin")
    with pytest.raises(attendo.UnsafeCheckpointError, match="pickle"):
        attendo.load(tiny_model("gpt2")[0], adapter=tmp_path / "gpt2")


def test_adapter_flag_errors_exit_2(tiny_model, tmp_path, capsys):
    from attendo.cli import main

    directory = tiny_model("llama-gqa")[0]
    capsys.readouterr()
    assert main(["generate", "hi", "--model", str(directory), "--adapter", str(tmp_path), "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no adapter_config.json" in err


def test_server_serves_an_adapter_as_a_model_of_its_own(tiny_model, tmp_path):
    from attendo.server import ServerSettings
    from attendo.server.app import create_app
    from test_server import LiveServer

    directory = tiny_model("llama-gqa")[0]
    model = attendo.load(directory)
    add_lora(model, LoraSettings(rank=4, target_modules=("all-linear",)))
    _randomize_adapter(model, seed=4)
    save_adapter(model, tmp_path / "tuned")
    base = str(directory)
    server = LiveServer(create_app(ServerSettings(models=[base], adapters={"tuned": str(tmp_path / "tuned")}))).wait_ready()
    try:
        client = server.client()
        assert [m.id for m in client.models.list().data] == [base, "tuned"]
        for name, expected in ((base, attendo.load(directory)), ("tuned", model)):
            text = client.completions.create(model=name, prompt="Hello", max_tokens=6, temperature=0).choices[0].text
            assert text == expected.generate("Hello", max_new_tokens=6, do_sample=False).text
    finally:
        server.stop()
    from attendo.cli import main

    assert main(["serve", "--model", base, "--adapter", f"x={tmp_path}"]) == 2


def test_peft_rank_and_alpha_patterns_and_rslora(tiny_model, tmp_path):
    """Per-layer ranks (read from the tensors' shapes), per-layer alphas and rank-stabilised
    scaling (alpha / sqrt(rank)) as peft applies them."""
    directory = tiny_model("llama-gqa")[0]
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
        rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}, use_rslora=True,
    )  # fmt: skip
    torch.manual_seed(5)
    adapted = peft.get_peft_model(_reference(directory), config).eval()
    adapted.save_pretrained(tmp_path / "patterns")
    model = attendo.load(directory, adapter=tmp_path / "patterns")
    part = model.network.blocks[0].attn.qkv.parts["v_proj"]
    assert part.rank == 2 and part.scale == pytest.approx(8 / 2**0.5)
    inputs = _inputs(model)
    assert max_diff(_attendo_logits(model, inputs), _reference_logits(adapted, inputs)) < 1e-4
