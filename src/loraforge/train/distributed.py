"""Training on several processes: torchrun's environment -> a process group, the model wrapped for DDP or
FSDP2, sums over ranks, and rank-0 gating.

    dist = setup(cfg.device)            # Dist(rank=0, world=1) outside torchrun: nothing changes
    fwd = wrap(model, "fsdp", dist, trainable_params)
    n_global, = dist.sum([n_local])

loraforge has no launcher of its own: `torchrun --nproc_per_node N -m loraforge train ...` sets RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT, and `loraforge train --nproc N` re-runs the same command
through `torch.distributed.run` (cli/train.py). CPU processes talk over gloo, CUDA ones over NCCL.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LoraForgeError

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float]) -> list[float]:
        """The element-wise sum over ranks (float64, so token counts stay exact)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, text: str) -> str:
        """Rank 0's `text` on every rank."""
        if not self.active:
            return text
        box = [text]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def from_env() -> Dist:
    """The process's place in a torchrun job (rank 0 of 1 outside one)."""
    try:
        return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise LoraForgeError("RANK / WORLD_SIZE / LOCAL_RANK: not integers; start several processes with "
                             "torchrun or `loraforge train --nproc N`") from None


def setup(device: str | None) -> tuple[Dist, str | None, bool]:
    """Join torchrun's process group (if there is one) and pick this rank's device.

    Returns (dist, device, joined): on CUDA each process takes GPU LOCAL_RANK, as torchrun intends;
    joined says the group was made here (and is ours to destroy)."""
    dist = from_env()
    if not dist.active:
        return dist, device, False
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        if dist.local_rank >= torch.cuda.device_count():
            raise LoraForgeError(f"LOCAL_RANK {dist.local_rank}: this machine has {torch.cuda.device_count()} GPU(s), "
                                 "one per process is needed; start fewer processes per machine, or pass --device cpu")
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
    if torch.distributed.is_initialized():
        return dist, device or "cpu", False
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=dist.rank, world_size=dist.world)
    return dist, device or "cpu", True


def is_peer_loss(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another rank went away (gloo: the connection closed;
    NCCL: the communicator aborted or timed out)."""
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in ("gloo", "connection", "nccl", "peer"))


def shutdown(dist: Dist) -> None:
    if dist.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- wrapping ---------------------------------------------------------------------------------------------------
def wrap(model: nn.Module, strategy: str, dist: Dist, trained: dict[str, nn.Parameter],
         outside_forward: bool = False) -> tuple[nn.Module, list[nn.Parameter]]:
    """(the module to call for training forwards, the trained tensors whose gradients `sync_grads` must sum).

    The module is the model itself (one process), DDP around it, or the model made FSDP2 in place (each
    decoder layer, then the root). FSDP registers new (sharded) parameters in
    place of the old ones, so `trained` is updated to the ones the model now holds: build the optimizer
    after this.

    outside_forward: the trained tensors are used outside model.forward (prefix tuning builds its prefix
    before the call), so FSDP leaves them unsharded and `sync_grads` sums their gradients instead."""
    if not dist.active:
        return model, []
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Only the trained tensors are DDP's business: the frozen base and its buffers are identical on every
        # rank (loaded from the same files), so DDP neither broadcasts them at start nor at every forward.
        trained_ids = {id(p) for p in trained.values()}
        frozen = [n for n, p in model.named_parameters() if id(p) not in trained_ids]
        frozen += [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        device_ids = [model.inv_freq.device.index] if model.inv_freq.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids), []
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(model.inv_freq.device.type, (dist.world,))
        shard_quantized_codes(model)
        ignored = set(trained.values()) if outside_forward else set()
        owners = _owners(model, trained)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, ignored_params=ignored & set(layer.parameters()) or None)
        fully_shard(model, mesh=mesh, ignored_params=ignored or None)
        for name, (m, attr) in owners.items():
            trained[name] = m._parameters[attr]
        # in the dict's order, the same on every rank: sync_grads' all-reduces must pair up
        return model, [p for p in trained.values() if p in ignored]
    raise LoraForgeError(f"strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")


def _owners(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, tuple[nn.Module, str]]:
    """name -> (module, attribute) holding each of `params`."""
    where = {id(p): name for name, p in params.items()}
    return {where[id(p)]: (m, attr) for m in model.modules() for attr, p in m._parameters.items()
            if p is not None and id(p) in where}


# QuantLinear's state that grows with the weight: the packed 4-bit codes and the per-block scales.
_SHARDED_QUANT = ("weight", "absmax", "nested_absmax")


def shard_quantized_codes(model: nn.Module) -> int:
    """Turn each quantized layer's packed codes and scales from buffers into frozen parameters, which FSDP2
    shards (it shards parameters only). uint8 parameters all-gather as they are: no float view of the bytes,
    which would have to match a mixed-precision param_dtype. Returns how many tensors moved."""
    moved = 0
    for m in model.modules():
        if not hasattr(m, "quant_type"):
            continue
        for name in _SHARDED_QUANT:
            t = m._buffers.get(name)
            if t is not None and t.dim() >= 1:
                del m._buffers[name]
                m.register_parameter(name, nn.Parameter(t, requires_grad=False))
                moved += 1
    return moved


@contextlib.contextmanager
def accumulating(fwd: nn.Module, last: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    from torch.nn.parallel import DistributedDataParallel

    if last:
        yield
    elif isinstance(fwd, DistributedDataParallel):
        with fwd.no_sync():
            yield
    elif hasattr(fwd, "set_requires_gradient_sync"):  # an FSDP2 module
        fwd.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            fwd.set_requires_gradient_sync(True)
    else:
        yield


def sync_grads(dist: Dist, params: list[nn.Parameter]) -> None:
    """Sum the gradients of plain (unsharded, non-DDP) parameters over ranks and divide by the world size,
    as DDP and FSDP do for theirs."""
    from torch.distributed.tensor import DTensor

    if not dist.active:
        return
    for p in params:
        if p.grad is not None and not isinstance(p, DTensor):
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(dist.world)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """torch's clip_grad_norm_, with the total norm of sharded (DTensor) gradients taken over all ranks."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a collective: every rank must call it), a plain one as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@contextlib.contextmanager
def gathered(model: nn.Module, trained: dict[str, nn.Parameter]):
    """Inside, the model's trained tensors are whole plain parameters (to write the adapter from); the
    sharded ones come back after. Every rank must enter (the gather is a collective); nothing may run a
    forward inside."""
    sharded = {id(p) for p in trained.values() if hasattr(p, "full_tensor")}
    if not sharded:
        yield
        return
    swaps = []
    with torch.no_grad():
        for m in model.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and id(p) in sharded:
                    swaps.append((m, name, p))
                    m._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=False)
    try:
        yield
    finally:
        for m, name, p in swaps:
            m._parameters[name] = p
