"""Training under torchrun on this machine with 2 processes (gloo on the CPU): DDP gives the loss
curve of one process with the same global batch (to float tolerance), FSDP too, a run resumes
from a checkpoint written by a different number of processes, and a DDP run frees its process
group when it ends (so gloo's threads are stopped before the interpreter exits)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attendo.train import checkpoint
from attendo.train.report import read_log
from test_train import TINY, _corpus

FLAGS = [
    "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--vocab-size", "300", "--eval-every", "3",
    "--save-every", "3", "--precision", "float32", "--lr", "3e-3", "--seed", "1",
    *(f"--set={k}={v}" for k, v in TINY.items()),
]  # fmt: skip


# `attendo` that also fails (70) when its process group outlives the run; for DDP only: under
# FSDP, torch's DTensor caches keep the device mesh and so the group alive.
GROUP_FREED = Path(__file__).with_name("attendo_group_freed.py")


def _torchrun(data: Path, out: Path, *extra: str, check_group_freed: bool = False) -> None:
    attendo = [str(GROUP_FREED)] if check_group_freed else ["-m", "attendo"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        *attendo, "train", str(data), "--out", str(out), *FLAGS, *extra,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def _one_process(data: Path, out: Path, *extra: str) -> None:
    from attendo.cli import main

    assert main(["train", str(data), "--out", str(out), *FLAGS, *extra]) == 0


def _assert_same_curve(a: Path, b: Path) -> None:
    left, right = read_log(a), read_log(b)
    assert [r["step"] for r in left] == [r["step"] for r in right] == list(range(1, 7))
    for x, y in zip(left, right):
        assert x["tokens"] == y["tokens"] and x["lr"] == y["lr"]
        for key in ("loss", "grad_norm", "eval_loss"):
            assert (x.get(key) is None) == (y.get(key) is None)
            if x.get(key) is not None:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for name in weights_a:
        assert torch.allclose(weights_a[name], weights_b[name], atol=1e-5), name


def _stopped_at_step_3(run: Path, copy: Path) -> Path:
    """A copy of a finished run as if it had stopped after step 3."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-0000006")
    (copy / "checkpoints" / "latest").unlink()
    assert checkpoint.latest_checkpoint(copy).name == "step-0000003"
    return copy


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(data, one process, two processes with DDP): the same command."""
    root = tmp_path_factory.mktemp("distributed")
    data = _corpus(root / "data")
    _one_process(data, root / "one")
    _torchrun(data, root / "ddp", check_group_freed=True)
    return data, root / "one", root / "ddp"


def test_ddp_on_two_processes_follows_one_process(runs):
    _, one, ddp = runs
    _assert_same_curve(one, ddp)
    assert checkpoint.read_state(checkpoint.latest_checkpoint(ddp))["world_size"] == 2


def test_resume_on_a_different_number_of_processes(runs, tmp_path):
    data, one, ddp = runs
    from_two = _stopped_at_step_3(ddp, tmp_path / "from-two")
    _one_process(data, from_two, "--resume")  # written by 2 processes, finished by 1
    _assert_same_curve(one, from_two)

    from_one = _stopped_at_step_3(one, tmp_path / "from-one")
    _torchrun(data, from_one, "--resume", "--strategy", "fsdp")  # written by 1, finished by 2 with FSDP
    _assert_same_curve(one, from_one)
