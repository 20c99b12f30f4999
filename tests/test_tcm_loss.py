"""TCMLoss equals PML's ThresholdConsistentMarginLoss (value and gradient) and composes."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

from train.losses import SharedCosineSimilarity, TCMCrossBatchMemory, TCMLoss  # noqa: E402

pytestmark = pytest.mark.torch

TOL = {"atol": 1e-10, "rtol": 1e-8}


def _batch(seed: int, b: int = 24, d: int = 8, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (b,), generator=g)
    return emb, labels


def _value_and_grad(loss_fn, emb, *args, **kwargs):
    x = emb.clone().requires_grad_(True)
    loss = loss_fn(x, *args, **kwargs)
    loss.backward()
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    return loss.detach(), grad


def _assert_same(ours, theirs):
    assert torch.allclose(torch.as_tensor(ours[0], dtype=torch.float64), theirs[0].double(), **TOL)
    assert torch.allclose(ours[1], theirs[1], **TOL)


MARGINS = {
    "paper": {},
    "no_active_positive": {"margin_plus": -2.0},
    "no_active_negative": {"margin_minus": 2.0},
    "nothing_active": {"margin_plus": -2.0, "margin_minus": 2.0},
    "weighted": {"lambda_plus": 0.3, "lambda_minus": 2.5, "margin_plus": 0.2, "margin_minus": 0.0},
}


@pytest.mark.parametrize("case", sorted(MARGINS))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_pml(case: str, seed: int) -> None:
    params = MARGINS[case]
    emb, labels = _batch(seed)
    ours = _value_and_grad(TCMLoss(**params), emb, labels)
    theirs = _value_and_grad(pml_losses.ThresholdConsistentMarginLoss(**params), emb, labels)
    _assert_same(ours, theirs)
    if case == "nothing_active":
        assert ours[0] == 0.0
        assert torch.count_nonzero(ours[1]) == 0


@pytest.mark.parametrize("labels_kind", ["distinct", "single_class"])
def test_degenerate_labels(labels_kind: str) -> None:
    emb, _ = _batch(3, b=10)
    labels = torch.arange(10) if labels_kind == "distinct" else torch.zeros(10, dtype=torch.long)
    ours = _value_and_grad(TCMLoss(margin_minus=-1.0), emb, labels)
    theirs = _value_and_grad(
        pml_losses.ThresholdConsistentMarginLoss(margin_minus=-1.0), emb, labels
    )
    _assert_same(ours, theirs)
    assert ours[0] > 0


def _pml_on_stacked(emb, labels, ref, ref_labels, **params):
    """PML indexes ref pairs into ``embeddings``; run it on [emb; ref] with shifted pairs."""
    b = len(emb)
    pos = labels[:, None] == ref_labels[None, :]
    a1, p = torch.where(pos)
    a2, n = torch.where(~pos)
    stacked = torch.cat([emb, ref])
    loss = pml_losses.ThresholdConsistentMarginLoss(**params)
    return loss(stacked, torch.cat([labels, ref_labels]), (a1, p + b, a2, n + b))


@pytest.mark.parametrize("case", ["paper", "weighted"])
def test_ref_emb_matches_pml_on_stacked_input(case: str) -> None:
    emb, labels = _batch(4, b=12)
    ref, ref_labels = _batch(5, b=20)
    params = MARGINS[case]
    x, r = emb.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    ours = TCMLoss(**params)(x, labels, ref_emb=r, ref_labels=ref_labels)
    ours.backward()
    x2, r2 = emb.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    theirs = _pml_on_stacked(x2, labels, r2, ref_labels, **params)
    theirs.backward()
    assert torch.allclose(ours, theirs, **TOL)
    assert torch.allclose(x.grad, x2.grad, **TOL)
    assert torch.allclose(r.grad, r2.grad, **TOL)


@pytest.mark.parametrize("miner_name", ["pairs", "triplets"])
def test_indices_tuple_from_miner_matches_pml(miner_name: str) -> None:
    emb, labels = _batch(6, b=32)
    if miner_name == "pairs":
        miner = pml_miners.MultiSimilarityMiner(epsilon=0.3)
    else:
        miner = pml_miners.TripletMarginMiner(margin=0.5, type_of_triplets="all")
    tuples = miner(emb, labels)
    assert len(tuples[0]) > 0
    ours = _value_and_grad(TCMLoss(), emb, labels, tuples)
    theirs = _value_and_grad(pml_losses.ThresholdConsistentMarginLoss(), emb, labels, tuples)
    _assert_same(ours, theirs)


def test_float32_within_tolerance() -> None:
    emb, labels = _batch(7, b=64, d=32)
    emb = emb.float()
    ours = _value_and_grad(TCMLoss(), emb, labels)
    theirs = _value_and_grad(pml_losses.ThresholdConsistentMarginLoss(), emb, labels)
    assert torch.allclose(ours[0], theirs[0], atol=1e-6)
    assert torch.allclose(ours[1], theirs[1], atol=1e-6)


def test_multiple_losses_sum() -> None:
    emb, labels = _batch(8)
    base, tcm = pml_losses.MultiSimilarityLoss(), TCMLoss()
    both = pml_losses.MultipleLosses([base, tcm], weights=[1.0, 0.5])
    expected = base(emb, labels) + 0.5 * tcm(emb, labels)
    assert torch.allclose(both(emb, labels), expected, **TOL)


def test_shared_similarity_is_computed_once_and_changes_nothing() -> None:
    emb, labels = _batch(9)
    shared = SharedCosineSimilarity()
    both = pml_losses.MultipleLosses(
        [pml_losses.MultiSimilarityLoss(distance=shared), TCMLoss(distance=shared)]
    )
    plain = pml_losses.MultipleLosses([pml_losses.MultiSimilarityLoss(), TCMLoss()])
    got, want = _value_and_grad(both, emb, labels), _value_and_grad(plain, emb, labels)
    _assert_same(got, want)
    assert shared.hits == 1
    emb2, _ = _batch(10)  # a new batch must not hit the cache
    both(emb2, labels)
    assert shared.hits == 2  # one hit in that call, not two


def test_shared_similarity_never_serves_a_freed_batch() -> None:
    shared = SharedCosineSimilarity()
    base, tcm = pml_losses.MultiSimilarityLoss(distance=shared), TCMLoss(distance=shared)
    for seed in range(4):  # new tensors whose id() may be the freed previous batch's
        emb, labels = _batch(seed)
        x = emb.clone().requires_grad_(True)
        (base(x, labels) + tcm(x, labels)).backward()
        del x
    assert shared.hits == 4


def test_from_similarity_equals_forward() -> None:
    emb, labels = _batch(11)
    loss = TCMLoss()
    sim = torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(emb).T
    assert torch.allclose(loss.from_similarity(sim, labels), loss(emb, labels), **TOL)


def test_cross_batch_memory_uses_the_memory() -> None:
    d = 8
    emb1, labels1 = _batch(12, b=16, d=d)
    emb2, labels2 = _batch(13, b=16, d=d)
    xbm = TCMCrossBatchMemory(TCMLoss(), embedding_size=d, memory_size=64)
    xbm.embedding_memory = xbm.embedding_memory.double()
    first = xbm(emb1, labels1)
    # First step: memory = this batch, self-pairs removed = the plain batch loss.
    assert torch.allclose(first, TCMLoss()(emb1, labels1), **TOL)
    x = emb2.clone().requires_grad_(True)
    second = xbm(x, labels2)
    second.backward()
    mem, mem_labels = torch.cat([emb1, emb2]), torch.cat([labels1, labels2])
    pos = labels2[:, None] == mem_labels[None, :]
    pos[:, 16:].fill_diagonal_(False)
    neg = labels2[:, None] != mem_labels[None, :]
    a1, p = torch.where(pos)
    a2, n = torch.where(neg)
    y = emb2.clone().requires_grad_(True)
    stacked = torch.cat([y, mem.detach()])
    want = pml_losses.ThresholdConsistentMarginLoss()(
        stacked, torch.cat([labels2, mem_labels]), (a1, p + 16, a2, n + 16)
    )
    want.backward()
    assert torch.allclose(second, want, **TOL)
    assert torch.allclose(x.grad, y.grad, **TOL)


def test_plain_cross_batch_memory_refuses_tcm() -> None:
    with pytest.raises(Exception, match="not supported"):
        pml_losses.CrossBatchMemory(TCMLoss(), embedding_size=4)


def test_distributed_wrapper_without_process_group_is_the_plain_loss() -> None:
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    emb, labels = _batch(14)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = DistributedLossWrapper(TCMLoss())(emb, labels)
    assert torch.allclose(got, TCMLoss()(emb, labels), **TOL)


def test_rejects_non_cosine_distance_and_negative_weights() -> None:
    from pytorch_metric_learning.distances import LpDistance

    with pytest.raises(AssertionError):
        TCMLoss(distance=LpDistance())
    with pytest.raises(ValueError, match="lambda_plus"):
        TCMLoss(lambda_plus=-1.0)


def test_records_terms() -> None:
    emb, labels = _batch(15)
    loss = TCMLoss()
    value = loss(emb, labels)
    total = loss.lambda_plus * loss.pos_term + loss.lambda_minus * loss.neg_term
    assert torch.allclose(value, total, **TOL)
    assert int(loss.active_pos) > 0 and int(loss.active_neg) > 0


def test_statistics_report_terms_counts_and_margins() -> None:
    emb, labels = _batch(16)
    loss = TCMLoss(margin_plus=0.7, margin_minus=0.2)
    assert loss.statistics() == {"margin_plus": 0.7, "margin_minus": 0.2}  # nothing run yet
    loss(emb, labels)
    stats = loss.statistics()
    assert stats["pos_term"] == pytest.approx(float(loss.pos_term))
    assert stats["neg_term"] == pytest.approx(float(loss.neg_term))
    assert stats["active_pos"] == int(loss.active_pos) > 0
    assert all(isinstance(v, float) for v in stats.values())


def test_set_margins_moves_both_terms_like_a_new_loss() -> None:
    emb, labels = _batch(17)
    moved = TCMLoss()
    moved.set_margins(0.3, -0.1)
    _assert_same(
        _value_and_grad(moved, emb, labels),
        _value_and_grad(
            pml_losses.ThresholdConsistentMarginLoss(margin_plus=0.3, margin_minus=-0.1),
            emb,
            labels,
        ),
    )
    assert moved.statistics()["margin_minus"] == -0.1
