"""DDP helpers: a global batch for the losses, with a correct gradient path.

Every rank gathers all ranks' embeddings and labels and computes the *same* global
loss L. ``all_gather`` alone carries no gradient, so :class:`_GatherWithGrad` routes
it back: rank r's embeddings receive sum over ranks of dL/de_r (an all-reduce of the
incoming gradients, then r's slice). That is W * dL/de_r, and DDP's gradient averaging
divides by W again, so parameters get exactly dL/dtheta of the global batch, and the
reported loss is the global-batch loss itself (no world-size factor, unlike PML's
DistributedLossWrapper, which returns W * L to get the same gradients).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def gather_batch(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(global embeddings with gradient, global labels); identity outside DDP.

    Ranks must hold the same number of rows (drop_last=True batches guarantee it).
    """
    if not is_distributed():
        return emb, labels
    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, labels.contiguous())
    return _GatherWithGrad.apply(emb), torch.cat(parts)


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. its early-stopping decision); identity alone."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.broadcast(value, src=0)
    return bool(value.item())


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); False when single-process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True
