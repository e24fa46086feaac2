"""InfoNCE and the hard-negative sampler, checked against hand computations (no model needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moon3.train.contrastive import warmup_cosine
from moon3.train.data import HardNegativeSampler, PairData
from moon3.train.loss import LearnableTemperature, contrastive_loss


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_infonce_matches_hand_computation():
    torch.manual_seed(0)
    q, p = _unit(torch.randn(3, 8)), _unit(torch.randn(5, 8))  # 3 positives + 2 hard negatives
    pos, ids = torch.arange(3), torch.arange(5)
    tau = torch.tensor(0.1)
    got = contrastive_loss(q, p, pos, ids, tau)
    s = (q @ p.T / 0.1).numpy()
    q2p = np.mean([-(s[i, i] - np.log(np.exp(s[i]).sum())) for i in range(3)])
    p2q = np.mean([-(s[i, i] - np.log(np.exp(s[:, i]).sum())) for i in range(3)])
    assert got.item() == pytest.approx((q2p + p2q) / 2, rel=1e-5)


def test_perfect_alignment_gives_low_loss_and_random_gives_log_n():
    eye = torch.eye(4)
    low = contrastive_loss(eye, eye, torch.arange(4), torch.arange(4), torch.tensor(0.01))
    assert low.item() < 1e-6
    same = _unit(torch.ones(4, 4))  # all identical: every candidate equally likely
    flat = contrastive_loss(same, same, torch.arange(4), torch.arange(4), torch.tensor(0.05))
    assert flat.item() == pytest.approx(math.log(4), rel=1e-5)


def test_duplicate_product_is_not_its_own_negative():
    torch.manual_seed(1)
    q = _unit(torch.randn(2, 8))
    p = torch.stack([q[0], q[0]])  # both queries bought the same product, in the batch twice
    ids = torch.tensor([7, 7])
    masked = contrastive_loss(q, p, torch.arange(2), ids, torch.tensor(0.05))
    unmasked = contrastive_loss(q, p, torch.arange(2), torch.arange(2), torch.tensor(0.05))
    assert masked.item() < unmasked.item()
    assert torch.isfinite(masked)


def test_temperature_is_clamped_and_learnable():
    t = LearnableTemperature(0.05)
    assert t().item() == pytest.approx(0.05)
    with torch.no_grad():
        t.log_tau.fill_(math.log(1e-4))
    assert t().item() == pytest.approx(0.01)
    t = LearnableTemperature(0.05)
    q = _unit(torch.randn(4, 8))
    contrastive_loss(q, q, torch.arange(4), torch.arange(4), t()).backward()
    assert t.log_tau.grad is not None and t.log_tau.grad.abs().item() > 0


def test_warmup_cosine_shape():
    f = warmup_cosine(10, 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(99) < 0.11 and f(55) < f(20)


def test_sampler_hard_negatives_shards_and_determinism(mini_dataset):
    data = PairData(mini_dataset, "train")
    one = HardNegativeSampler(data, batch_size=8, hard_negatives=1, seed=0, world_size=1)
    two = HardNegativeSampler(data, batch_size=4, hard_negatives=1, seed=0, world_size=2)
    b = one.batch(3)
    assert len(b.query_rows) == 8 and len(b.product_rows) == 16 and b.n_positives == 8
    # Positives are the queries' own products; negatives share the positive's leaf category, except for
    # category-name queries, whose negatives come from outside the named category.
    assert (b.product_rows[:8] == data.positive_rows[b.query_rows]).all()
    for query, pos, neg in zip(b.query_rows, b.product_rows[:8], b.product_rows[8:], strict=True):
        level = data.category_level[query]
        if level < 0:
            assert data.leaf_of_product[pos] == data.leaf_of_product[neg]
        else:
            assert data.path_names[neg, level] != data.path_names[pos, level]
    assert len(set(b.product_rows[8:]) & set(b.product_rows[:8])) == 0
    # Deterministic per step; the two ranks' shards make up the same global queries as one process.
    assert (one.batch(3).product_rows == b.product_rows).all()
    r0, r1 = two.batch(3, 0), two.batch(3, 1)
    assert (np.concatenate([r0.query_rows, r1.query_rows]) == b.query_rows).all()
    assert len(r0.product_rows) == len(r1.product_rows) == 8
    # Every query is seen once per epoch.
    seen = np.concatenate([one.batch(s).query_rows for s in range(one.batches_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == one.batches_per_epoch * 8


def test_sampler_rejects_tiny_data(mini_dataset):
    data = PairData(mini_dataset, "train")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        HardNegativeSampler(data, batch_size=len(data), hard_negatives=1, seed=0, world_size=2)


def test_category_queries_mark_every_product_under_the_category_relevant(mini_dataset):
    data = PairData(mini_dataset, "train")
    category = np.flatnonzero(data.category_level >= 0)
    assert set(data.category_level[category]) == {0, 1, 2}  # mbe3-mini asks for names at every level
    plain = int(np.flatnonzero(data.category_level < 0)[0])
    products = np.arange(len(data.products))
    for query in category[:12]:
        level = data.category_level[query]
        name = data.queries.loc[query, "query_text"]
        relevant = data.relevant(np.array([query]), products)[0]
        assert (relevant == (data.path_names[:, level] == name)).all() and relevant.sum() > 1
        # Hard negatives of a category query: never under the category itself; siblings (same parent) first.
        pool = data.hard_negative_pool(int(query), np.random.default_rng(0))
        assert len(pool) == (~relevant).sum() and not relevant[pool].any()
        parent = (data.path_names[pool, :level] == data.path_names[data.positive_rows[query], :level]).all(axis=1)
        assert not (np.diff(parent.astype(int)) > 0).any()  # no sibling after a non-sibling
    assert not data.relevant(np.array([plain]), products).any()


def test_attribute_matched_hard_negatives_share_attributes_not_the_category(mini_dataset):
    data = PairData(mini_dataset, "train")
    query = int(np.flatnonzero(data.category_level < 0)[0])
    pos = data.positive_rows[query]
    pool = data.hard_negative_pool(query, np.random.default_rng(0), "attribute_matched")
    shared = (data.attribute_codes[pool] == data.attribute_codes[pos]).sum(axis=1)
    assert (data.leaf_of_product[pool] != data.leaf_of_product[pos]).all()
    assert (np.diff(shared) <= 0).all() and shared[0] > shared[-1]  # most shared attribute values first
    with pytest.raises(ValueError, match="hard_negative_mode"):
        HardNegativeSampler(data, batch_size=4, hard_negatives=1, seed=0, mode="nearest")


def test_relevant_products_are_not_negatives_in_either_direction():
    q = _unit(torch.randn(3, 8))
    p = torch.cat([q, _unit(torch.randn(2, 8))])  # positives 0..2, then two extra products
    ids, pos, tau = torch.arange(5), torch.arange(3), torch.tensor(0.1)
    relevant = torch.zeros(3, 5, dtype=torch.bool)
    relevant[0, 1] = relevant[0, 3] = True  # products 1 and 3 also answer query 0
    masked = contrastive_loss(q, p, pos, ids, tau, relevant)
    # Same as dropping product 3 from query 0's row and product 1 from both directions of the pair (0, 1).
    logits = q @ p.T / tau
    logits[0, 1] = logits[0, 3] = float("-inf")
    q2p = torch.nn.functional.cross_entropy(logits, pos)
    p2q = logits.T[pos].clone()
    p2q[1, 0] = float("-inf")  # product 1 (query 1's positive) scored against query 0
    expected = (q2p + torch.nn.functional.cross_entropy(p2q, torch.arange(3))) / 2
    assert torch.allclose(masked, expected)
