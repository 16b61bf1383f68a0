"""Training on several processes with PyTorch's own machinery (torchrun, DDP, FSDP).

`torchrun --nproc_per_node N -m attendo train ...` starts N copies of the command with RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address in their environment; `start()` reads them and
joins the process group (gloo on CPUs, NCCL on GPUs). Without torchrun it is one process and
nothing here does anything.

- DDP (the default) keeps a whole copy of the model in every process; after each backward pass
  the gradients are averaged across processes, so every copy takes the same optimizer step.
- FSDP (`--strategy fsdp`, torch's fully_shard) splits every block's parameters, gradients and
  optimizer state across the processes and gathers a block's weights only while it computes:
  for models whose training state does not fit one process.

Only rank 0 writes logs, checkpoints and the output model; the others wait for it at barriers.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start() -> Processes:
    """Join the process group torchrun set up, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world_size == 1:
        return Processes(device=device)
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def finish(processes: Processes) -> None:
    """Tear the process group down, and with it gloo's worker threads.

    destroy_process_group frees the group only when nothing else holds it; until then gloo's
    worker threads run on, and one that frees a finished collective's tensors (made in Python)
    while the interpreter exits dies taking the GIL: std::terminate, and the process aborts after
    a good run. A DDP wrapper that a reference cycle keeps (torch makes such cycles itself)
    still holds the group, so garbage is collected first."""
    if processes.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def wrap(network: nn.Module, processes: Processes, strategy: str) -> nn.Module:
    """The module the training step calls: the network itself, or its DDP / FSDP wrapper."""
    if not processes.distributed:
        return network
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Each block is its own unit (gathered while it computes); the root unit holds the rest,
        # embeddings and head together, so tied weights stay in one unit.
        for module in network.modules():
            for block in getattr(module, "blocks", ()):
                fully_shard(block)
        return fully_shard(network)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(network, device_ids=[processes.device.index] if processes.device.type == "cuda" else None)


def all_sum(values: list[float], processes: Processes) -> list[float]:
    """Element-wise sum over every process (float64, so sums of counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=processes.device)
    if processes.distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(processes: Processes) -> None:
    if not processes.distributed:
        return
    if dist.get_backend() == "gloo":
        # gloo's barrier keeps the collectives still in flight when it is issued (weakly) and
        # frees them on a gloo worker thread when it is freed itself. Their tensors were made in
        # Python, so that thread takes the GIL, and a thread that takes it while the interpreter
        # exits dies mid-destructor: std::terminate, SIGABRT. That matters when the process
        # group outlives destroy_process_group (under FSDP, torch's DTensor caches keep its
        # device mesh and so the group alive) and a barrier is the last collective before exit.
        # monitored_barrier waits on this thread, with tensors made in C++ and no worker.
        dist.monitored_barrier()
    else:
        dist.barrier()


def gather_tensors(tensor: torch.Tensor, processes: Processes) -> list[torch.Tensor]:
    """Every process's tensor (all the same shape), on every process."""
    if not processes.distributed:
        return [tensor]
    gathered = [torch.empty_like(tensor) for _ in range(processes.world_size)]
    dist.all_gather(gathered, tensor)
    return gathered
