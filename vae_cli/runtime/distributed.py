"""Data parallelism through torch.distributed, launched by torchrun.

`torchrun --nproc_per_node=N -m vae_cli train ...` starts N processes with RANK,
WORLD_SIZE and LOCAL_RANK set. Every rank holds the whole dataset on its device and walks
the same permutation; global batch t is split into N disjoint slices, one per rank. Gradients
are averaged by DistributedDataParallel, so N ranks take exactly the step one process would
take on the global batch (trainer.batch_size stays the global batch; the posterior noise is
drawn for the global batch on every rank and sliced, see objective/parallel.py). Rank 0
alone writes.
"""

from __future__ import annotations

import os
from datetime import datetime

import torch
import torch.distributed as dist

from vae_cli.errors import UserError, one_line


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def init() -> None:
    """Join the process group: gloo for CPU tensors, nccl for CUDA ones where available."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"cannot join the torchrun process group ({one_line(e)})"
                        ) from None
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def run_dir_args(args: list[str]) -> list[str]:
    """Overrides that give every rank rank 0's run folder, and keep the others from writing
    Hydra's files: exactly one run folder, however the launch times round to seconds."""
    if any(a.lstrip("+").startswith(("-m", "--multirun")) for a in args):
        raise UserError("a multirun sweep cannot run under torchrun; sweep with "
                        "hydra/launcher=... and start torchrun per job instead")
    extra = []
    if not any(a.startswith(("hydra.run.dir=", "ckpt=")) for a in args):
        stamp = [f"outputs/{datetime.now():%Y-%m-%d}/{datetime.now():%H-%M-%S}"]
        dist.broadcast_object_list(stamp, src=0)
        extra.append(f"hydra.run.dir={stamp[0]}")
    if rank() != 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return [*args, *extra]


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over the model. DDP averages the gradients of the parameters
    that require them when it is built; parameters frozen then (an adversarial critic,
    trained by its own auxiliary step) are left to average_grads."""
    if world() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def average_grads(params) -> None:
    """Mean of each gradient over ranks, for parameters outside DistributedDataParallel:
    one all-reduce of the gradients laid end to end, not one per tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    if world() == 1 or not grads:
        return
    flat = all_mean(torch.cat([g.reshape(-1) for g in grads]))
    for g, mean in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(mean.view_as(g))


def all_max(t: torch.Tensor) -> torch.Tensor:
    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_max_int(value: int, device: torch.device) -> int:
    return int(all_max(torch.tensor(value, device=device)).item()) if world() > 1 else value


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if world() > 1:
        dist.all_reduce(t)
    return t


def all_mean(t: torch.Tensor) -> torch.Tensor:
    if world() > 1:
        dist.all_reduce(t)
        t /= world()
    return t


def check_replicas(model: torch.nn.Module) -> None:
    """Every rank must hold the same weights; a cheap fingerprint per epoch catches a
    replica that drifted (a parameter outside DDP whose gradients were not averaged)."""
    if world() == 1:
        return
    with torch.no_grad():
        fp = torch.stack([p.detach().double().sum() for p in model.parameters()])
    lo, hi = fp.clone(), fp.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.allclose(lo, hi, rtol=1e-5, atol=1e-6):
        names = [n for (n, _), a, b in zip(model.named_parameters(), lo, hi, strict=True)
                 if not torch.isclose(a, b, rtol=1e-5, atol=1e-6)]
        raise RuntimeError(f"data-parallel replicas differ in {', '.join(names[:5])}")


def broadcast(obj):
    """Rank 0's value of a picklable object on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(finished: bool) -> None:
    """Leave the group. After a finished run the ranks first wait for each other (rank 0
    may still be writing pictures): a rank tearing gloo down while a peer is alive can
    abort in C++ at exit. After an error there is no waiting, a peer may never arrive."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
