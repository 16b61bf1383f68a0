"""Broken or unsupported checkpoints fail with the documented typed error, naming the file."""

from __future__ import annotations

import json
import pathlib
import pickle

import pytest
from safetensors.torch import load_file, save_file

import attendo
from attendo import CheckpointError, ModelNotFoundError, UnsafeCheckpointError, UnsupportedModelError
from conftest import copy_model


@pytest.fixture
def model_dir(tiny_llama_dir, tmp_path) -> pathlib.Path:
    """A private copy of the tiny LLaMA directory, free to break."""
    return copy_model(tiny_llama_dir, tmp_path / "model")


def rewrite_tensors(directory: pathlib.Path, change) -> None:
    weights = directory / "model.safetensors"
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})


def test_the_intact_copy_loads(model_dir):
    assert attendo.load(model_dir).config.n_kv_heads == 2  # so the failures below come from the damage


def test_a_tensor_of_the_wrong_shape(model_dir):
    name = "model.layers.1.self_attn.k_proj.weight"

    def shrink(tensors):
        tensors[name] = tensors[name][:-1].clone()

    rewrite_tensors(model_dir, shrink)
    with pytest.raises(CheckpointError) as error:
        attendo.load(model_dir)
    assert str(model_dir) in str(error.value) and name in str(error.value)


def test_a_missing_tensor(model_dir):
    name = "model.layers.0.mlp.up_proj.weight"
    rewrite_tensors(model_dir, lambda tensors: tensors.pop(name))
    with pytest.raises(CheckpointError, match="missing tensor") as error:
        attendo.load(model_dir)
    assert str(model_dir) in str(error.value) and name in str(error.value)


@pytest.mark.parametrize("keep", [4, 200, -100], ids=["no-header", "cut-header", "cut-data"])
def test_a_truncated_safetensors_file(model_dir, keep):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    with pytest.raises(CheckpointError) as error:
        attendo.load(model_dir)
    assert str(weights) in str(error.value)


def booby_trapped_pickle(path: pathlib.Path, marker: pathlib.Path) -> None:
    """A pickle that creates `marker` when unpickled."""

    class Trap:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    path.write_bytes(pickle.dumps({"weight": Trap()}))


def test_a_pickle_directory_is_refused_unread(model_dir, tmp_path):
    marker = tmp_path / "unpickled"
    (model_dir / "model.safetensors").unlink()
    booby_trapped_pickle(model_dir / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeCheckpointError) as error:
        attendo.load(model_dir)
    assert str(model_dir / "pytorch_model.bin") in str(error.value)
    assert not marker.exists()


def test_a_pickle_file_is_refused_unread(tmp_path):
    marker, path = tmp_path / "unpickled", tmp_path / "model.pt"
    booby_trapped_pickle(path, marker)
    with pytest.raises(UnsafeCheckpointError) as error:
        attendo.load(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_an_unknown_architecture(model_dir):
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "mamba"
    config_path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="'mamba'") as error:
        attendo.load(model_dir)
    assert str(model_dir) in str(error.value)


def test_a_nonexistent_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as error:
        attendo.load(missing)
    assert str(missing) in str(error.value)


def test_an_unknown_registered_name():
    with pytest.raises(ModelNotFoundError, match="llama-9000") as error:
        attendo.load("llama-9000")
    assert "smollm2-135m-instruct" in str(error.value)  # the message lists the names that exist
