"""Multi-process launching that also works without CUDA (gloo) and under ``torchrun``.

Detectron2 v0.6's ``launch`` asserts CUDA and uses NCCL. Here:
- with CUDA and no torchrun environment, Detectron2's own ``launch`` is used unchanged;
- without CUDA, ``--num-gpus N`` starts N CPU processes per machine that talk over gloo;
- under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK set), the process group comes from the
  environment and no processes are spawned.

When one process fails (raises, exits, is killed), torch's ``start_processes`` terminates the
others on this machine (SIGTERM, then SIGKILL after 30 s), and :func:`launch` raises
:class:`ProcessFailedError` naming the failed rank. Processes on *other* machines, or survivors
whose parent died, are bounded by ``timeout``: a collective that waits longer for a dead peer
fails (gloo; NCCL with its default async error handling), and the process exits non-zero.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup_local_group(num_per_machine: int) -> None:
    """Give Detectron2's ``comm`` its per-machine process group (get_local_rank etc.)."""
    if hasattr(comm, "create_local_process_group"):  # upstream main
        comm.create_local_process_group(num_per_machine)
        return
    # v0.6 has no public helper; every rank must create every group, in the same order.
    world = dist.get_world_size()
    rank = dist.get_rank()
    for start in range(0, world, num_per_machine):
        group = dist.new_group(list(range(start, start + num_per_machine)))
        if start <= rank < start + num_per_machine:
            comm._LOCAL_PROCESS_GROUP = group  # the only handle v0.6 offers


def _worker(
    local_rank,
    main_func,
    world_size,
    num_per_machine,
    machine_rank,
    backend,
    dist_url,
    args,
    timeout,
):
    rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(
        backend, init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout
    )
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    _setup_local_group(num_per_machine)
    comm.synchronize()
    main_func(*args)
    # Only after success: tearing the group down while a peer still waits in a collective is
    # pointless, and the process exit releases everything anyway.
    dist.destroy_process_group()


class ProcessFailedError(RuntimeError):
    """One process of a multi-process run failed; the others were terminated."""


def _failed(error: Exception, machine_rank: int, num_per_machine: int) -> ProcessFailedError:
    index = getattr(error, "error_index", None)
    if index is None:
        return ProcessFailedError(f"a process failed: {error}")
    rank = machine_rank * num_per_machine + index
    if isinstance(error, mp.ProcessExitedException):
        how = getattr(error, "signal_name", None)
        detail = f"was killed by {how}" if how else f"exited with code {error.exit_code}"
    else:
        detail = f"raised an exception:{error}"
    hint = ""
    if "timed out" in detail.lower():
        hint = (
            "\nA collective timed out (--dist-timeout-s): another rank probably died or hung "
            "first; look for its error in its log."
        )
    return ProcessFailedError(
        f"rank {rank} (process {index} of {num_per_machine} on machine {machine_rank}) {detail}"
        f"{hint}\nThe other processes of this machine were terminated."
    )


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Run ``main_func(*args)`` in every process of a (possibly single-process) job.

    On machines without CUDA, ``num_gpus_per_machine`` is the number of CPU processes.
    ``timeout`` bounds how long a collective waits for a peer (see the module docstring).

    Raises:
        ProcessFailedError: a spawned process failed; the message names its rank.
    """
    use_cuda = torch.cuda.is_available()
    if launched_by_torchrun():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
        if use_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        _setup_local_group(int(os.environ["LOCAL_WORLD_SIZE"]))
        comm.synchronize()
        main_func(*args)
        dist.destroy_process_group()
        return
    world_size = num_machines * num_gpus_per_machine
    if use_cuda:
        try:
            d2_launch(
                main_func,
                num_gpus_per_machine,
                num_machines,
                machine_rank,
                dist_url=dist_url or "auto",
                args=args,
                timeout=timeout,
            )
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            raise _failed(e, machine_rank, num_gpus_per_machine) from e
        return
    if world_size <= 1:
        main_func(*args)
        return
    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError("--dist-url auto only works on one machine; give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    logger.info(f"Launching {num_gpus_per_machine} CPU processes (gloo) at {dist_url}")
    try:
        mp.start_processes(
            _worker,
            nprocs=num_gpus_per_machine,
            args=(
                main_func,
                world_size,
                num_gpus_per_machine,
                machine_rank,
                "gloo",
                dist_url,
                args,
                timeout,
            ),
            daemon=False,
            start_method="spawn",
        )
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        raise _failed(e, machine_rank, num_gpus_per_machine) from e
