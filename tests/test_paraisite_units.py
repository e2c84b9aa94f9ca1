"""Target transform, loss and metrics against hand-computed values; splits."""
import math

import numpy as np
import pytest
import torch

from paraisite.metrics import mape_loss, regression_metrics
from paraisite.report import PAPER_MAPE, paper_name, paper_value
from paraisite.splits import nine_splits, split_indices, split_parts
from paraisite.transform import MAX_LOG10, TargetTransform


def test_transform_fits_population_statistics_and_inverts():
    y = torch.tensor([0.0, 9.0, 99.0])  # log10(y+1) = 0, 1, 2
    t = TargetTransform.fit(y)
    assert t.mean == pytest.approx(1.0)
    assert t.std == pytest.approx(math.sqrt(2 / 3))  # population std of (0, 1, 2)
    z = t.forward(y)
    torch.testing.assert_close(z, torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3))
    torch.testing.assert_close(t.inverse(z), y, atol=1e-4, rtol=1e-5)


def test_inverse_is_guarded_against_overflow():
    t = TargetTransform(mean=1.0, std=1.0)
    y = t.inverse(torch.tensor([1e4, -1e4], requires_grad=True))
    assert torch.isfinite(y).all()
    assert float(y[0]) == pytest.approx(10**MAX_LOG10 - 1)
    loss = mape_loss(y, torch.tensor([1.0, 1.0]))
    loss.backward()
    assert torch.isfinite(loss)


def test_mape_loss_by_hand():
    pred = torch.tensor([1.5, 2.0, 0.0])
    true = torch.tensor([1.0, 4.0, 2.0])
    # |0.5|/1 + |2|/4 + |2|/2 = 0.5 + 0.5 + 1.0 -> mean 2/3
    assert float(mape_loss(pred, true)) == pytest.approx(2 / 3)


def test_regression_metrics_by_hand():
    true = [1.0, 2.0, 3.0, 4.0]
    pred = [1.0, 2.0, 3.0, 6.0]
    m = regression_metrics(true, pred)
    assert m["mae"] == pytest.approx(0.5)
    assert m["rmse"] == pytest.approx(1.0)
    assert m["mape"] == pytest.approx(0.125)
    assert m["r2"] == pytest.approx(1 - 4 / 5)
    with pytest.raises(ValueError):
        regression_metrics([1.0], [1.0, 2.0])


def test_splits_match_upstream_rule_and_are_disjoint():
    for k, (train, val) in enumerate(nine_splits(95), start=1):
        perm = np.random.RandomState(k).permutation(95)
        assert list(train) == list(perm[:76]) and list(val) == list(perm[76:])
        assert len(set(train) & set(val)) == 0 and len(set(train) | set(val)) == 95
    a, b = split_indices(3269, 4), split_indices(3269, 4)
    assert (a[0] == b[0]).all() and len(a[1]) == 654
    assert not np.array_equal(split_indices(95, 1)[1], split_indices(95, 2)[1])


def test_mix_is_split_per_source():
    train, val = split_parts([95, 143], 3)
    t1, v1 = split_indices(95, 3)
    t2, v2 = split_indices(143, 3)
    assert list(train) == list(t1) + list(t2 + 95)
    assert list(val) == list(v1) + list(v2 + 95)


@pytest.mark.parametrize("init,dataset,name", [
    ("rw", "togo15", "RWTG15"), ("fe", "aflow_agl", "FEAF"), ("rw", "aflow_agl", "RWAF"),
    ("fe+af", "togo15", "FEAFTG15"), ("rw+af", "togo15", "RWAFTG15"), ("fe+af", "mix", "FEAFMIX"),
])
def test_paper_names_and_their_numbers(init, dataset, name):
    assert paper_name(init, dataset) == name
    assert paper_value(init, dataset, "togo15", "mape") == PAPER_MAPE[name]["togo15"]
