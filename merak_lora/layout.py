"""Who is who: ranks, pipeline stages and data-parallel replicas, from the environment torchrun or Slurm set.

Ranks of one pipeline are contiguous (rank = dp_rank * pp + pp_rank), so a pipeline sits on neighbouring
GPUs of a node where it can and the small LoRA gradient all-reduce is what crosses nodes.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .config import ConfigError
from .coordinate import Coordinator
from .entry import env_ranks
from .launch import free_port


@dataclass
class Layout:
    rank: int
    world: int
    local_rank: int
    pp: int                      # ranks per pipeline
    chunks: int                  # stages (model chunks) per rank; > 1 for interleaved and V schedules
    v_shape: bool                # zbv/dualpipev: rank r holds stages r and 2pp-1-r
    device: torch.device
    pp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    dp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    coord: Coordinator | None = field(default=None, repr=False)

    @property
    def dp(self) -> int:
        return self.world // self.pp

    @property
    def pp_rank(self) -> int:
        return self.rank % self.pp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.pp

    @property
    def num_stages(self) -> int:
        return self.pp * self.chunks

    def stage_ids(self) -> list[int]:
        """Global stage indices held by this rank, in pipeline order."""
        return stages_of_rank(self.pp_rank, self.pp, self.chunks, self.v_shape)

    def global_rank_of(self, pp_rank: int, dp_rank: int | None = None) -> int:
        return (self.dp_rank if dp_rank is None else dp_rank) * self.pp + pp_rank

    def holds_data(self, pp_rank: int | None = None) -> bool:
        """Whether a rank's stages need token ids or targets: those holding the first or the last stage."""
        ids = self.stage_ids() if pp_rank is None else stages_of_rank(pp_rank, self.pp, self.chunks, self.v_shape)
        return 0 in ids or self.num_stages - 1 in ids


def stages_of_rank(pp_rank: int, pp: int, chunks: int, v_shape: bool) -> list[int]:
    if v_shape:  # rank r holds stage r and its mirror 2pp-1-r, so first and last stage share rank 0
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + c * pp for c in range(chunks)]


def rank_of_stage(stage: int, pp: int, v_shape: bool) -> int:
    if v_shape and stage >= pp:
        return 2 * pp - 1 - stage
    return stage % pp


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is visible")
    count = torch.cuda.device_count()
    dev = torch.device("cuda", local_rank % count)
    torch.cuda.set_device(dev)
    return dev


def check_a_gpu_each(coord: Coordinator, host: str, gpu: str, visible: int) -> None:
    """Stop every rank with the launch that fixes it when two ranks of a node were given one GPU (more ranks a
    node than GPUs): NCCL would refuse it only inside its start-up, as an error about its own internals."""
    if coord.add(f"gpu/{host}/{gpu}", 1) > 1:
        coord.fail(f"rank {coord.rank} and another rank on {host} were given the same GPU: NCCL needs a GPU of "
                   f"its own for each rank; start one rank per GPU ({visible} visible here): torchrun "
                   f"--nproc_per_node {visible}, or srun --ntasks-per-node {visible} or --gpus-per-task 1")
    try:
        coord.barrier("gpus", "checking that each rank holds a GPU of its own")
    except ConfigError:
        coord.leave()  # rank 0 hosts the store: every rank reads the error before it goes
        raise


def _rendezvous(rank: int, world: int, timeout: datetime.timedelta):
    """The job's store, hosted by rank 0 at MASTER_ADDR:MASTER_PORT. A port another process holds is the job's
    set-up, not a peer's failure, so rank 0 says so at once instead of leaving the others to wait out the timeout."""
    try:
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    except dist.DistNetworkError as e:
        if rank != 0 or "EADDRINUSE" not in str(e):
            raise
        raise ConfigError(f"rank 0 cannot host the job's rendezvous: MASTER_PORT={os.environ['MASTER_PORT']} is "
                          f"taken on {socket.gethostname()} (another job or process holds it); start the job with "
                          f"MASTER_PORT set to a free port, e.g. MASTER_PORT={free_port('')}") from e
    return store


def init_distributed(pp: int, chunks: int, v_shape: bool, device_choice: str = "auto",
                     timeout_s: int = 300) -> Layout:
    """Start the process group (gloo on CPU, NCCL on GPU) on the job's rendezvous store, build the dp x pp groups,
    and keep the store for start-up coordination (coordinate.py)."""
    rank, world, local_rank = env_ranks()
    device = pick_device(device_choice, local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    coord = Coordinator(dist.HashStore(), rank, world)
    if world > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        store = _rendezvous(rank, world, timeout)
        coord = Coordinator(dist.PrefixStore("merak", store), rank, world)
        if not dist.is_initialized():
            if device.type == "cuda":
                check_a_gpu_each(coord, socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid),
                                 torch.cuda.device_count())
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                                    timeout=timeout, device_id=device if device.type == "cuda" else None)
    pp = pp or world
    layout = Layout(rank=rank, world=world, local_rank=local_rank, pp=pp, chunks=chunks, v_shape=v_shape,
                    device=device, coord=coord)
    if world > 1:
        # Every rank must take part in creating every group, in the same order.
        for d in range(world // pp):
            ranks = list(range(d * pp, (d + 1) * pp))
            g = dist.new_group(ranks)
            if rank in ranks:
                layout.pp_group = g
        for p in range(pp):
            ranks = list(range(p, world, pp))
            g = dist.new_group(ranks)
            if rank in ranks:
                layout.dp_group = g
    return layout
