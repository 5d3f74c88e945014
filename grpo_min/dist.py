"""Small distributed helpers over ``torch.distributed`` (torchrun): no-ops in a single process.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; ``setup`` joins the process group (NCCL on GPUs,
gloo on CPU) and picks this rank's device. Everything else reads like the single-process code.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as td


def is_distributed() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    if is_distributed():
        return td.get_rank()
    # Before setup() under torchrun (parsing options, say), the launcher's RANK already tells who prints.
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def world_size() -> int:
    return td.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kw):
    if is_main():
        print(*args, **kw, flush=True)


def setup() -> torch.device:
    """Join the process group when launched by torchrun; return this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def cleanup():
    if is_distributed():
        td.barrier()
        td.destroy_process_group()


def barrier():
    if is_distributed():
        td.barrier()


def on_main_first(fn):
    """Run ``fn`` on rank 0 first (e.g. building a cached model), then on the others."""
    if is_main():
        result = fn()
        barrier()
        return result
    barrier()
    return fn()


def wrap(model: torch.nn.Module, fsdp: bool = False) -> torch.nn.Module:
    """Shard with FSDP2 (``fsdp``) or replicate with DDP when distributed; else the model itself.

    FSDP2 shards in place: the vision tower and every decoder layer become units of their own, then
    the root. The vision tower must be its own unit because ``generate`` calls it directly, outside
    the root module's forward, where a unit's parameters would otherwise still be sharded.
    """
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if not is_distributed():  # FSDP2 needs a process group, even for one process
            td.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1,
                                  init_method="file://" + _tmp_file())
        inner = model.model
        fully_shard(inner.visual)
        for layer in inner.language_model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _tmp_file() -> str:
    """A path for the one-process group's rendezvous file, in a private folder removed at exit."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="grpo_min_pg_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return os.path.join(folder, "store")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def no_sync_unless_last(model, last: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation window."""
    if is_distributed() and not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate an equally shaped tensor from every rank, in rank order."""
    if not is_distributed():
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    td.all_gather(out, t.contiguous())
    return torch.cat(out)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        td.all_reduce(t)
    return t


def reduce_dict_sum(values: dict[str, float], device) -> dict[str, float]:
    """Sum each float over ranks, in one all-reduce."""
    keys = sorted(values)
    summed = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device))
    return dict(zip(keys, summed.tolist()))
