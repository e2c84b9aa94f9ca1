"""Target transform, loss and metrics against hand-computed values; splits."""
import math

import numpy as np
import pytest
import torch

from paraisite.data.datasets import LTCDataset
from paraisite.evaluation.metrics import mape_loss, regression_metrics
from paraisite.evaluation.paper_scale import PaperScale
from paraisite.evaluation.report import PAPER_MAPE, paper_name, paper_value
from paraisite.data.splits import holdout_parts, nine_splits, split_indices, split_parts
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


def test_holdout_takes_the_selection_part_from_the_training_part_only():
    for k in (1, 5):
        train, val = split_parts([95, 143], k)
        fit, select, val2 = holdout_parts([95, 143], k, 0.1)
        assert list(val2) == list(val)  # the validation part is the paper's
        assert sorted(np.concatenate([fit, select])) == sorted(train) and not set(fit) & set(select)
        assert len(select) == round(0.1 * 76) + round(0.1 * 114)  # per source: 8 of Togo15's 76, 11 of the 114
        assert (select < 95).sum() == 8
        fit_again, select_again, _ = holdout_parts([95, 143], k, 0.1)
        assert list(fit_again) == list(fit) and list(select_again) == list(select)
    assert not np.array_equal(holdout_parts([95], 1, 0.1)[1], holdout_parts([95], 2, 0.1)[1])
    data = LTCDataset("t", [str(i) for i in range(95)], ["X"] * 95, torch.ones(95), [], [("togo15", 95)])
    assert [list(a) for a in data.training_parts(3, None)] == [list(split_indices(95, 3)[0])] + [list(split_indices(95, 3)[1])] * 2
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="between 0 and 1"):
            holdout_parts([95], 1, bad)


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


def _labels_only(name: str, *parts: np.ndarray) -> LTCDataset:
    """A dataset of labels alone (the paper's scale needs no graph), one part per source."""
    ltc = np.concatenate(parts)
    names = [name] if len(parts) == 1 else [f"{name}{i}" for i in range(len(parts))]
    return LTCDataset(name, [str(i) for i in range(len(ltc))], [""] * len(ltc), torch.tensor(ltc, dtype=torch.float32),
                      [None] * len(ltc), [(n, len(p)) for n, p in zip(names, parts)])


def _upstream(y: np.ndarray, source: np.ndarray, module: np.ndarray) -> np.ndarray:
    """g: standardise with the whole of ``source`` (log10(y+1), population std), turn back with ``module``'s."""
    s, m = np.log10(source.astype(np.float32) + 1), np.log10(module.astype(np.float32) + 1)
    return 10 ** ((np.log10(y + 1) - s.mean()) / s.std() * m.std() + m.mean()) - 1


def test_paper_scale_is_the_plain_mape_on_the_training_set_and_upstreams_mapping_elsewhere():
    rng = np.random.default_rng(0)
    togo, aflow, hh = rng.lognormal(3, 1.7, 40), rng.lognormal(1.2, 0.8, 300), rng.lognormal(2, 0.5, 50)
    train, idx = _labels_only("togo15", togo), np.arange(30, 40)
    pred = torch.tensor(togo[idx] * rng.uniform(0.5, 1.8, 10), dtype=torch.float32)
    true = train.ltc[idx].double().numpy()
    # steps 1 and 2 on their own training set: no mapping at all
    rw = PaperScale.for_run("rw", train)
    assert rw.mape(train, idx, pred) == pytest.approx(float(mape_loss(pred.double(), torch.from_numpy(true))), rel=1e-6)
    # +af on its own training set: labels and predictions both through g_{TG->AF}
    af = PaperScale.for_run("fe+af", train, torch.tensor(aflow, dtype=torch.float32))
    g = lambda y: _upstream(y, togo, aflow)  # noqa: E731
    expected = np.mean(np.abs(g(true) - g(pred.double().numpy())) / g(true))
    assert af.mape(train, idx, pred) == pytest.approx(expected, rel=1e-5)
    assert af.mape(train, idx, pred) < rw.mape(train, idx, pred)  # AFLOW's narrower spread shrinks relative errors
    # another test set of two sources: each source's labels through its own scaler, predictions through L's
    mix = _labels_only("mix", togo, hh)
    both = np.array([3, 7, 40 + 2, 40 + 9])
    guess = torch.tensor([5.0, 80.0, 3.0, 12.0])
    labels = np.concatenate([_upstream(togo[[3, 7]], togo, togo), _upstream(hh[[2, 9]], hh, togo)])
    expected = np.mean(np.abs(labels - _upstream(guess.double().numpy(), togo, togo)) / labels)
    assert rw.mape(mix, both, guess) == pytest.approx(expected, rel=1e-5)
    # a model trained on MIX has no single upstream scaler
    assert PaperScale.for_run("rw", mix) is None
    with pytest.raises(ValueError, match="AFLOW labels"):
        PaperScale.for_run("fe+af", train)


def test_job_clock_estimates_the_whole_job_from_its_own_pace(tmp_path):
    import io

    from paraisite.training.clock import JobClock, StageWork
    from paraisite.training.processes import cpu_processes
    from paraisite.training.rundir import RunDir

    aflow, target = RunDir(tmp_path / "aflow"), RunDir(tmp_path / "target")
    out = io.StringIO()
    clock = JobClock(out=out)
    clock.add(StageWork("FEAF", aflow, [1, 2], epochs=10, n_train=100))
    clock.add(StageWork("FEAFTG15", target, [1, 2], epochs=10, n_train=10))
    assert clock.estimate() is None  # nothing timed yet
    (aflow.path / "split1").mkdir(parents=True)
    (aflow.path / "split1" / "curve.csv").write_text("epoch,train_loss\n1,0.5\n")
    clock.epoch_done("FEAF", [1], 1, 5.0)  # 5 s for 100 structure-epochs: 0.05 s each
    left = (19 * 100 + 20 * 10) * 0.05  # the AFLOW stage's 19 epochs left of 100 structures, then 20 of 10
    assert clock.estimate() == pytest.approx(left)
    assert "[FEAF] split 1, epoch 1 of 10, 5.0 s/epoch; whole job: 0 of 4 models done, about 2 min left" in out.getvalue()
    two = JobClock(processes=2, rank=1, out=out)  # the job's work is shared: half the time left, and who says it
    two.add(StageWork("FEAF", aflow, [1, 2], epochs=10, n_train=100))
    two.add(StageWork("FEAFTG15", target, [1, 2], epochs=10, n_train=10))
    two.epoch_done("FEAF", [1], 1, 5.0)
    assert two.estimate() == pytest.approx(left / 2)
    assert "process 2 of 2: [FEAF] split 1, epoch 1 of 10" in out.getvalue()
    assert cpu_processes("auto", 9, cores=2) == (2, 1) and cpu_processes("auto", 1, cores=16) == (1, 16)
    assert cpu_processes("auto", 9, cores=16) == (9, 1) and cpu_processes("3", 9, cores=16) == (3, 5)


def loaded_published_tensors(model) -> tuple[int, int]:
    """(published tensors found, by value, among the model's MEGNet tensors; published tensors in all)."""
    import os

    published = torch.load(os.path.join(os.environ["PARAISITE_HOME"], "weights", "MEGNet-MP-2018.6.1-Eform", "state.pt"),
                           map_location="cpu", weights_only=True)
    ours = list(model.megnet.state_dict().values())
    found = sum(any(t.shape == p.shape and torch.equal(t.float(), p.float()) for t in ours) for p in published.values())
    return found, len(published)


def test_init_fe_loads_every_published_tensor(shared, tmp_path):
    """Upstream's load_state_dict(strict=False) with prefixed keys loaded nothing (docs/results.md); --init fe must
    start from every one of the 106 published tensors, and a random start must fail the same check."""
    from conftest import working_folder
    from paraisite.training.loop import TrainConfig, initial_model

    with working_folder(tmp_path):
        found, total = loaded_published_tensors(initial_model(TrainConfig(init="fe"), 1))
        assert total == 106 and found == total
        found_rw, _ = loaded_published_tensors(initial_model(TrainConfig(init="rw"), 1))
    assert found_rw < total // 2  # the check can fail: a random MEGNet matches only constants (e.g. the RBF centres)


def test_sre_log_mae_and_spearman_by_hand():
    from paraisite.evaluation.metrics import regression_metrics

    t = np.array([1.0, 10.0, 100.0, 4.0])
    p = np.array([3.0, 10.0, 50.0, -1.0])  # the last as a collapsed model predicts it
    m = regression_metrics(t, p)
    # SRE: 2*2/4, 0, 2*50/150, 2*5/5
    assert m["sre"] == pytest.approx((1.0 + 0 + 2 / 3 + 2.0) / 4)
    # log10 MAE: |log 3|, 0, |log 0.5|, |log 1e-3 - log 4|
    assert m["log10_mae"] == pytest.approx((math.log10(3) + 0 + math.log10(2) + (3 + math.log10(4))) / 4)
    # ranks of t: 1 3 4 2; of p: 2 3 4 1 -> d = -1 0 0 1, sum d^2 = 2, rho = 1 - 6*2/(4*15)
    assert m["spearman"] == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert math.isnan(regression_metrics(t, np.ones(4))["spearman"])


def test_spawn_returns_the_failing_ranks_code_and_stops_the_others(tmp_path):
    """train.py's own launcher: a rank that fails ends the job with its exit code; the rank waiting for it is stopped."""
    import time

    from paraisite.training.processes import spawn

    script = tmp_path / "job.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '1':\n    sys.exit(3)\n"
                      "time.sleep(60)\n")
    t0 = time.monotonic()
    assert spawn(str(script), [], processes=2, threads=1) == 3
    assert time.monotonic() - t0 < 30
    ok = tmp_path / "ok.py"
    ok.write_text("import os\nassert os.environ['WORLD_SIZE'] == '2' and os.environ['OMP_NUM_THREADS'] == '1'\n")
    assert spawn(str(ok), [], processes=2, threads=1) == 0


def test_a_barrier_whose_peer_stopped_says_so_not_gloo(monkeypatch):
    from paraisite.training.processes import barrier

    def peer_gone():
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:3460. GLHF!")

    monkeypatch.setattr(torch.distributed, "barrier", peer_gone)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match=r"^process 2 of 2: another process of this job stopped before it got here"):
        barrier(2)
    barrier(1)  # one process: no barrier at all
