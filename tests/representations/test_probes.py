"""Probes recover a planted truth direction; CV never splits a group; head ranking finds the planted head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmrepro.representations import probes


def planted(n=800, d=16, seed=0, margin=1.0):
    """Gaussian activations (offset from the origin) whose label is carried by one random unit direction."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)) + 3.0 + np.outer(2 * y - 1, u) * margin
    return x, y, u, np.repeat(np.arange(n // 2), 2)


@pytest.mark.parametrize("name", ["mass-mean", "mass-mean-iid", "logistic"])
def test_linear_probes_recover_the_planted_direction(name):
    x, y, u, groups = planted()
    clf = probes.PROBES[name](0).fit(x, y)
    target = u
    w = {"logistic": lambda: clf[-1].coef_[0] / clf[0].scale_, "mass-mean": lambda: clf.direction_,
         "mass-mean-iid": lambda: clf.weights_}[name]()
    cos = np.dot(w, target) / np.linalg.norm(w) / np.linalg.norm(target)
    assert cos > 0.9
    acc = probes.cross_val_accuracy(x, y, groups, name, "grouped", 5, 0)
    assert acc.mean() > 0.80  # the Bayes rate for means +-1 along u and unit noise is Phi(1) = 0.841


def test_mass_mean_iid_direction_is_the_inverse_covariance_times_the_mean_difference():
    x, y, u, _ = planted(n=2000, d=8)
    clf = probes.mm_probe().fit(x, y)
    xc = x - x.mean(0)
    mu1, mu0 = xc[y == 1].mean(0), xc[y == 0].mean(0)
    cent = np.concatenate([xc[y == 1] - mu1, xc[y == 0] - mu0])
    expected = np.linalg.inv(cent.T @ cent / len(x)) @ (mu1 - mu0)
    assert np.allclose(clf.weights_, expected, rtol=1e-6)
    assert np.allclose(probes.pinv_hermitian(cent.T @ cent / len(x), 1e-3),
                       torch.linalg.pinv(torch.tensor(cent.T @ cent / len(x)), hermitian=True, atol=1e-3).numpy())


def test_mass_mean_sigma_is_the_std_of_the_projections():
    x, y, _, _ = planted()
    clf = probes.mass_mean().fit(x, y)
    w = x[y == 1].mean(0) - x[y == 0].mean(0)
    assert np.allclose(clf.direction_, w / np.linalg.norm(w))
    assert clf.std_dev_ == pytest.approx(np.std(x @ (w / np.linalg.norm(w))))


def test_nonlinear_probes_learn_what_a_linear_one_cannot():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 4))
    y = (x[:, 0] * x[:, 1] > 0).astype(int)  # XOR: no linear direction separates it
    groups = np.arange(600)
    lin = probes.cross_val_accuracy(x, y, groups, "linear-svm", "grouped", 3, 0).mean()
    for name in ("rbf-svm", "mlp", "tree"):
        assert probes.cross_val_accuracy(x, y, groups, name, "grouped", 3, 0).mean() > lin + 0.2


def test_grouped_cv_never_splits_a_group_and_ungrouped_is_the_unshuffled_stratified_kfold():
    x, y, _, groups = planted(n=200)
    for train, test in probes.cv_splitter("grouped", 5, 0).split(x, y, groups):
        assert not set(groups[train]) & set(groups[test])
    from sklearn.model_selection import StratifiedKFold

    a = [t.tolist() for _, t in probes.cv_splitter("ungrouped", 5).split(x, y, groups)]
    assert a == [t.tolist() for _, t in StratifiedKFold(5).split(x, y)]


def test_rank_heads_puts_the_planted_head_first():
    x, y, _, groups = planted(n=300, d=8)
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(300, 2, 3, 8))
    acts[:, 1, 2] = x  # layer 1, head 2 carries the label
    acts[:, 0, 1] = x + rng.normal(size=x.shape) * 3  # a noisier copy ranks second
    acc = probes.rank_heads(acts, y, groups, "ungrouped", 5, 0)
    assert acc.shape == (2, 3)
    assert probes.ranked_heads(acc)[:2] == [(1, 2), (0, 1)]
