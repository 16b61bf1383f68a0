"""BERT (encoder-only) against transformers on tiny random checkpoints, loaded through attendo.load:
masked-LM logits, attention weights, fill-mask, sentence embeddings and their pooling configs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import attendo
from attendo.model_encoder import EncoderModel, pack_texts
from tiny_families import SENTENCES, jitter, max_diff, save, wordpiece_tokenizer

transformers = pytest.importorskip("transformers")


def _bert_config(vocab_size: int) -> object:
    return transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return wordpiece_tokenizer()


@pytest.fixture(scope="module")
def mlm(tmp_path_factory, tokenizer):
    """(directory, reference) of a BertForMaskedLM: its tensors are named bert.* and cls.*."""
    torch.manual_seed(0)
    config = _bert_config(tokenizer.get_vocab_size())
    reference = jitter(transformers.BertForMaskedLM(config), seed=1)
    reference.set_attn_implementation("eager")  # returns attention weights
    return save(reference, tokenizer, tmp_path_factory.mktemp("bert-mlm")), reference


@pytest.fixture(scope="module")
def bare(tmp_path_factory, tokenizer):
    """(directory, reference) of a bare BertModel saved as sentence-transformers does (CLS pooling
    and Normalize here, to check the configs are read), without an MLM head."""
    torch.manual_seed(1)
    reference = jitter(transformers.BertModel(_bert_config(tokenizer.get_vocab_size()), add_pooling_layer=False), seed=2)
    directory = save(reference, tokenizer, tmp_path_factory.mktemp("bert-bare"))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}))
    return directory, reference


def _ids(tokenizer, texts):
    encodings = [tokenizer.encode(t).ids for t in texts]
    longest = max(len(e) for e in encodings)
    ids = torch.tensor([e + [0] * (longest - len(e)) for e in encodings])
    return ids, ids != 0


def test_mlm_logits_and_attention_match_transformers(mlm, tokenizer):
    directory, reference = mlm
    model = attendo.load(directory)
    assert isinstance(model, EncoderModel) and model.has_mlm_head
    ids = torch.tensor([tokenizer.encode(SENTENCES[0]).ids])
    with torch.no_grad():
        expected = reference(ids, output_attentions=True)
    assert max_diff(model.logits(ids), expected.logits) < 1e-4
    maps = model.attention_maps(ids)
    assert maps.shape == (2, 1, 4, ids.shape[1], ids.shape[1])
    assert max_diff(maps, torch.stack(expected.attentions)) < 1e-5


def test_padding_is_masked_like_transformers(mlm, tokenizer):
    directory, reference = mlm
    model = attendo.load(directory)
    ids, real = _ids(tokenizer, SENTENCES[:3])
    with torch.no_grad():
        expected = reference(ids, attention_mask=real.long()).logits
        ours = model.network(ids, real)
    assert max_diff(ours[real], expected[real]) < 1e-4


def test_fill_mask_top1_agrees_with_transformers(mlm, tokenizer):
    directory, reference = mlm
    model = attendo.load(directory)
    for text in ("paris is the [MASK] of france", "the [MASK] is on the tree", "a small [MASK] and a big bird"):
        ids = tokenizer.encode(text).ids
        position = ids.index(tokenizer.token_to_id("[MASK]"))
        with torch.no_grad():
            probs = reference(torch.tensor([ids])).logits[0, position].softmax(-1)
        top = model.fill_mask(text, top_k=3)
        assert len(top) == 3
        assert top[0].token_id == int(probs.argmax())
        assert abs(top[0].probability - float(probs.max())) < 1e-5
        assert top[0].probability >= top[1].probability >= top[2].probability
        assert "[MASK]" not in top[0].text
    two = model.fill_mask("the [MASK] is on the [MASK]", top_k=2)
    assert len(two) == 2 and all(len(group) == 2 for group in two)


def test_fill_mask_needs_a_mask_and_valid_top_k(mlm):
    model = attendo.load(mlm[0])
    with pytest.raises(attendo.InvalidSettingError, match="MASK"):
        model.fill_mask("no blank here")
    with pytest.raises(attendo.InvalidSettingError, match="top_k"):
        model.fill_mask("the [MASK]", top_k=0)


def test_mean_pooled_embeddings_match_transformers(mlm, tokenizer):
    """No sentence-transformers files: mean pooling over real tokens, not normalized."""
    directory, reference = mlm
    model = attendo.load(directory)
    ids, real = _ids(tokenizer, SENTENCES)
    with torch.no_grad():
        hidden = reference.bert(ids, attention_mask=real.long()).last_hidden_state
    mask = real[..., None].float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    ours = model.embed(SENTENCES, batch_size=2)
    assert ours.shape == (len(SENTENCES), 32)
    assert max_diff(ours, expected) < 1e-5
    assert max_diff(model.embed(SENTENCES, normalize=True), F.normalize(expected, dim=-1)) < 1e-5


def test_embeddings_do_not_depend_on_how_texts_are_packed(mlm):
    """embed packs several texts into each row; each text still sees only itself, and its vector
    comes back in its place."""
    model = attendo.load(mlm[0])
    texts = SENTENCES + SENTENCES[::-1] + ["a", ""]
    one_by_one = torch.cat([model.embed(text) for text in texts])
    assert max_diff(model.embed(texts), one_by_one) < 1e-5
    assert max_diff(model.embed(texts, batch_size=3), one_by_one) < 1e-5
    with pytest.raises(attendo.InvalidSettingError, match="batch_size"):
        model.embed(texts, batch_size=0)


def test_pack_texts_fills_rows_and_keeps_each_text_to_itself():
    ids = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11], [12], [13, 14, 15, 16]]
    packed = pack_texts(ids, pad=0)
    # rows as wide as the longest text (6): [6], [4 + 2], [3 + 1 + pad 2]
    assert packed.tokens.tolist() == [[1, 2, 3, 4, 5, 6], [13, 14, 15, 16, 7, 8], [9, 10, 11, 12, 0, 0]]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]]
    assert packed.mask[1].long().tolist() == [[1, 1, 1, 1, 0, 0]] * 4 + [[0, 0, 0, 0, 1, 1]] * 2
    assert packed.mask[2, 3].tolist() == [False, False, False, True, False, False]
    assert packed.mask[2, 4].tolist() == [False, False, False, False, True, True]  # padding sees only padding
    # unpacking gives each text its own row back, in the order given
    flat = packed.tokens[..., None].float()
    texts = packed.unpack(flat)[..., 0].long()
    assert [row[real].tolist() for row, real in zip(texts, packed.real)] == ids


def test_sentence_transformers_pooling_config_is_followed(bare, tokenizer):
    """CLS pooling, L2 normalisation, and truncation to max_seq_length keeping [SEP]."""
    directory, reference = bare
    model = attendo.load(directory)
    assert not model.has_mlm_head
    assert (model.pooling.mode, model.pooling.normalize, model.pooling.max_length) == ("cls", True, 8)
    long_text = SENTENCES[4]
    ids = tokenizer.encode(long_text).ids
    truncated = ids[:7] + ids[-1:]
    assert model._encode_text(long_text, 8) == truncated
    batch = torch.tensor([truncated, tokenizer.encode(SENTENCES[0]).ids + [0] * (8 - len(tokenizer.encode(SENTENCES[0]).ids))])
    with torch.no_grad():
        hidden = reference(batch, attention_mask=(batch != 0).long()).last_hidden_state
    expected = F.normalize(hidden[:, 0], dim=-1)
    assert max_diff(model.embed([long_text, SENTENCES[0]]), expected) < 1e-5


def test_checkpoint_without_mlm_head_says_so(bare):
    model = attendo.load(bare[0])
    with pytest.raises(attendo.UnsupportedModelError, match="no masked-language-model head"):
        model.fill_mask("the [MASK] is red")
    with pytest.raises(attendo.UnsupportedModelError, match="no masked-language-model head"):
        model.logits([[2, 5, 3]])
    assert model.hidden_states([[2, 5, 3]]).shape == (1, 3, 32)
    with pytest.raises(attendo.UnsupportedModelError, match="encoder-only"):
        model.generate("the cat")


def test_unsupported_pooling_is_reported_on_embed(bare, tmp_path):
    directory = shutil.copytree(bare[0], tmp_path / "dense")
    modules = json.loads((directory / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (directory / "modules.json").write_text(json.dumps(modules))
    model = attendo.load(directory)  # still loads: hidden states work
    with pytest.raises(attendo.UnsupportedModelError, match="Dense"):
        model.embed("the cat")


def test_embed_and_fill_mask_on_a_decoder_say_what_is_needed():
    model = attendo.build("gpt2", n_layers=1, dim=32, n_heads=2, ffn_dim=64, vocab_size=300, context_length=32)
    with pytest.raises(attendo.UnsupportedModelError, match="encoder-only"):
        model.embed(["a text"])
    with pytest.raises(attendo.UnsupportedModelError, match="masked-language-model head"):
        model.fill_mask("a [MASK]")


def test_cli_fill_mask_embed_and_similarity(mlm, tmp_path, capsys):
    import numpy as np

    from attendo.cli import main

    directory = str(mlm[0])
    assert main(["fill-mask", "paris is the [MASK] of france", "--model", directory, "--json", "-k", "2"]) == 0
    (answers,) = json.loads(capsys.readouterr().out)
    assert len(answers) == 2 and answers[0]["probability"] >= answers[1]["probability"]
    vectors = tmp_path / "vectors.npy"
    assert main(["embed", "the cat", "a dog", "--model", directory, "--output", str(vectors)]) == 0
    assert np.load(vectors).shape == (2, 32)
    assert main(["embed", "the cat", "--model", directory]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]) == 32
    assert main(["similarity", "cat", "dog", "bird", "--model", directory]) == 0
    assert capsys.readouterr().out.count("°") == 3
    assert main(["similarity", "cat", "--model", directory]) == 2
