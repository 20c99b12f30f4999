"""DDP on CPU (gloo, 2 processes): the distributed loss and gradients equal one process on the
global batch, both with our gather and with PML's DistributedLossWrapper (which returns W x L)."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo.processes import free_port

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_metric_learning")

pytestmark = [pytest.mark.torch, pytest.mark.slow]

WORLD, PER_RANK, DIM_IN, DIM = 2, 8, 6, 5


def _global_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * PER_RANK, DIM_IN, generator=g)
    labels = torch.arange(WORLD * PER_RANK) % 5  # classes span both ranks
    weight = torch.randn(DIM, DIM_IN, generator=g)
    return x, labels, weight


def _losses():
    from pytorch_metric_learning.losses import MultiSimilarityLoss

    from train.losses import TCMLoss

    return TCMLoss(margin_plus=0.95, margin_minus=0.1), MultiSimilarityLoss()


def _model(weight):
    model = torch.nn.Linear(DIM_IN, DIM, bias=False)
    with torch.no_grad():
        model.weight.copy_(weight)
    return model


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    from train.distributed import gather_batch

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    torch.set_num_threads(1)
    x, labels, weight = _global_batch()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    tcm, ms = _losses()
    results = {}
    for mode in ("ours", "pml_wrapper"):
        model = torch.nn.parallel.DistributedDataParallel(_model(weight))
        emb = model(x[rows])
        if mode == "ours":
            all_emb, all_labels = gather_batch(emb, labels[rows])
            loss = tcm(all_emb, all_labels) + ms(all_emb, all_labels)
        else:
            loss = DistributedLossWrapper(tcm)(emb, labels[rows]) + DistributedLossWrapper(ms)(
                emb, labels[rows]
            )
        loss.backward()  # DDP averages parameter gradients over ranks
        results[mode] = (loss.detach(), model.module.weight.grad.clone())
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_distributed_loss_equals_single_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    x, labels, weight = _global_batch()
    model = _model(weight)
    tcm, ms = _losses()
    emb = model(x)
    want = tcm(emb, labels) + ms(emb, labels)
    want.backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        loss, grad = got["ours"]
        assert torch.allclose(loss, want.detach(), atol=1e-6)
        assert torch.allclose(grad, model.weight.grad, atol=1e-6)
        # PML's wrapper gives the same gradient but reports W x the global loss
        loss, grad = got["pml_wrapper"]
        assert torch.allclose(loss, WORLD * want.detach(), atol=1e-5)
        assert torch.allclose(grad, model.weight.grad, atol=1e-6)
