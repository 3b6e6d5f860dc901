"""Moments, their parallel merge, and the population estimators of Algorithm 2."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchnorm.functional import Moments, PopulationStats, merge_moments, reference


def _moments(x: torch.Tensor) -> Moments:
    var, mean = torch.var_mean(x, 0, correction=0)
    return Moments.from_batch(mean, var, x.shape[0])


@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6), offset=st.sampled_from([0.0, 1e6])
)
@settings(max_examples=60, deadline=None)
def test_chan_merge_equals_moments_of_the_union(sizes, offset):
    if sum(sizes) < 2:
        sizes = [*sizes, 2]
    parts = [torch.randn(n, 3, dtype=torch.float64) + offset for n in sizes]
    merged = Moments.from_batch(
        torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    )
    for p in parts:
        merged = merge_moments(
            merged,
            _moments(p)
            if len(p)
            else Moments.from_batch(
                torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
            ),
        )
    whole = torch.cat(parts)
    assert int(merged.count) == len(whole)
    torch.testing.assert_close(merged.mean, whole.mean(0), rtol=1e-12, atol=1e-12 * (1 + offset))
    torch.testing.assert_close(merged.var, whole.var(0, correction=0), rtol=1e-9, atol=1e-9)


def test_paper_estimator_matches_reference():
    batches = [torch.randn(16, 4, dtype=torch.float64) * 2 + 3 for _ in range(7)]
    acc = PopulationStats()
    for b in batches:
        var, mean = torch.var_mean(b, 0, correction=0)
        acc.update(mean, var, 16)
    mean_ref, var_ref = reference.paper_population_statistics(batches)
    torch.testing.assert_close(acc.paper()[0], mean_ref)
    torch.testing.assert_close(acc.paper()[1], var_ref)


def test_pooled_is_split_invariant_and_paper_is_not():
    """The pooled estimate does not depend on how the stream is batched; the paper's does."""
    data = torch.randn(240, 2, dtype=torch.float64) * 3 + torch.linspace(0, 5, 240)[:, None]
    estimates = {}
    for size in (8, 24, 60, 240):
        acc = PopulationStats()
        for chunk in data.split(size):
            var, mean = torch.var_mean(chunk, 0, correction=0)
            acc.update(mean, var, len(chunk))
        estimates[size] = (acc.pooled(), acc.paper())
    for size, (pooled, _) in estimates.items():
        torch.testing.assert_close(pooled[0], data.mean(0), msg=str(size))
        torch.testing.assert_close(pooled[1], data.var(0, correction=1), msg=str(size))
        torch.testing.assert_close(estimates[size][1][0], data.mean(0))  # equal sizes: same mean
    # the paper's variance ignores the spread of batch means (the data drift) for small batches
    assert (estimates[8][1][1] - data.var(0)).abs().max() > 0.1


def test_paper_and_pooled_agree_for_large_iid_batches():
    acc = PopulationStats()
    for _ in range(20):
        b = torch.randn(4000, 3, dtype=torch.float64) * 2 + 1
        var, mean = torch.var_mean(b, 0, correction=0)
        acc.update(mean, var, 4000)
    torch.testing.assert_close(acc.paper()[0], acc.pooled()[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.paper()[1], acc.pooled()[1], rtol=2e-3, atol=0)


def test_unequal_batches_use_each_batch_bessel_factor():
    acc = PopulationStats()
    acc.update(torch.tensor([0.0]), torch.tensor([1.0]), 2)  # unbiased 2
    acc.update(torch.tensor([0.0]), torch.tensor([3.0]), 4)  # unbiased 4
    assert acc.paper()[1].item() == pytest.approx(3.0)
    assert acc.samples == 6 and acc.batches == 2


def test_estimator_errors():
    acc = PopulationStats()
    with pytest.raises(RuntimeError, match="no mini-batches"):
        acc.paper()
    with pytest.raises(ValueError, match="m > 1"):
        acc.update(torch.zeros(2), torch.zeros(2), 1)
    acc.update(torch.zeros(2), torch.ones(2), 3)
    with pytest.raises(ValueError, match="unknown population estimator"):
        acc.estimate("median")


def test_merged_accumulators_equal_one_accumulator_and_pack_round_trips():
    """What processes do in recalibrate: accumulate shares of the stream, exchange, merge."""
    batches = [torch.randn(m, 3, dtype=torch.float64) * 2 + 1e4 for m in (5, 9, 5, 12, 7)]

    def accumulate(bs):
        acc = PopulationStats()
        for b in bs:
            var, mean = torch.var_mean(b, 0, correction=0)
            acc.update(mean, var, len(b))
        return acc

    whole = accumulate(batches)
    a, b = accumulate(batches[:2]), accumulate(batches[2:])
    merged = PopulationStats.unpack(a.pack(3)).merge(PopulationStats.unpack(b.pack(3)))
    assert merged.batches == whole.batches == 5 and merged.samples == whole.samples == 38
    for estimator in ("paper", "pooled"):
        for x, y in zip(merged.estimate(estimator), whole.estimate(estimator), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=0)
    empty = PopulationStats()
    assert empty.merge(a).batches == 2 and a.merge(empty).batches == 2
    assert PopulationStats.unpack(empty.pack(3)).batches == 0
    assert torch.equal(empty.pack(3), torch.zeros(14, dtype=torch.float64))
