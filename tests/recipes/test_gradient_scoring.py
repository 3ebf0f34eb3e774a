"""score-gradients and projection-quality against the source, re-computed independently: explain.py's scores (its
torch operations on (n, 1, D) float16 tensors) and its Python sort, NaN included; DAP_main_results.ipynb's
compute_metric (scipy kendalltau / spearmanr, sklearn ndcg_score with relevance 1/(rank + 1)) and
perform_median_tests; then both recipes end to end on the smoke profiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from sklearn.metrics import ndcg_score
from trak.projectors import BasicProjector, ProjectionType

from llmrepro.cli import main
from llmrepro.gradients import ranking, store
from llmrepro.lm.fixtures.tulu import EXCLUDED_ID
from llmrepro.recipes import projection_quality as pq

TRAIN, TEST = "gradients/olmo2-7b-sft-full-train", "gradients/olmo2-7b-sft-full-test"
PAIR = ("gradients/olmo2-7b-sft-rademacher204800-train", "gradients/olmo2-7b-sft-rademacher204800-test")  # smoke: 4096
N_TRAIN, N_TEST = 16, 3  # the smoke data cut down; train row 14 is open_orca_t0.1598436
CUT = [f"train.overrides=[data.limit={N_TRAIN}]", f"test.overrides=[data.limit={N_TEST}]"]
REF = "{{experiment: {}, profile: smoke, overrides: [data.limit={}]}}"
PROJECTED = f"projected=[{{train: {REF.format(PAIR[0], N_TRAIN)}, test: {REF.format(PAIR[1], N_TEST)}}}]"


def explain_py(train: torch.Tensor, test: torch.Tensor, method: str) -> list[list[dict]]:
    """explain.py on (N, D) / (M, D) gradients: (n, 1, D) tensors as it loaded them, its products and sums in their
    dtype, F.normalize for cosine, then a list of {score, index} per test sample sorted by list.sort."""
    train, test = train[:, None], test[:, None]
    normalized = F.normalize(train, p=2, dim=-1)
    out = []
    for t in test:  # (1, D)
        s = torch.sum(train * t, dim=-1) if method == "dot" else torch.sum(normalized * F.normalize(t, p=2, dim=-1), dim=-1)
        items = [{"score": float(s[i].item()), "index": i} for i in range(len(s))]
        items.sort(key=lambda x: x["score"], reverse=True)
        out.append(items)
    return out


def compute_metric(a: list, b: list, metric: str) -> float:
    """The notebook's compute_metric for one test sample: a and b are lists of ids, best first."""
    ranks_a, ranks_b = {x: r for r, x in enumerate(a)}, {x: r for r, x in enumerate(b)}
    rank_list_a, rank_list_b = [ranks_a[x] for x in a], [ranks_b[x] for x in a]
    if metric == "kendall":
        return stats.kendalltau(rank_list_a, rank_list_b)[0]
    if metric == "spearman":
        return stats.spearmanr(rank_list_a, rank_list_b)[0]
    return ndcg_score([[1 / (r + 1) for r in rank_list_a]], [[1 / (r + 1) for r in rank_list_b]])


# ------------------------------------------------------------------------------------------ explain.py

def zero_row_gradients():
    torch.manual_seed(0)
    train, test = (torch.randn(20, 5000) * 0.05).half(), (torch.randn(3, 5000) * 0.05).half()
    train[7] = 0  # the source's row 570: no label, all-zero gradient
    return train, test


@pytest.mark.parametrize("method", ["dot", "cosine"])
def test_source_scores_are_explain_py_s(method):
    train, test = zero_row_gradients()
    got = ranking.source_scores(test, train, method, chunk_rows=64)  # one chunk: explain.py's shapes
    expected = [sorted(items, key=lambda x: x["index"]) for items in explain_py(train, test, method)]
    np.testing.assert_array_equal(got, [[x["score"] for x in items] for items in expected])
    assert np.isnan(got[:, 7]).all() == (method == "cosine")  # float16 F.normalize(0) = 0/0
    assert (ranking.float32_scores(test, train, method)[:, 7] == 0).all()  # float32: eps keeps it 0


def test_source_order_is_explain_py_s_sort_and_a_nan_breaks_it():
    scores = [0.84, float("nan"), 0.23, 1.0, 0.47, 0.84, 0.48]
    items = [{"score": s, "index": i} for i, s in enumerate(scores)]
    items.sort(key=lambda x: x["score"], reverse=True)
    order = ranking.source_order(scores)
    assert order == [x["index"] for x in items]
    assert order == [0, 1, 3, 5, 6, 4, 2]  # 0.84 stays ahead of 1.0: the NaN left the list out of order
    assert ranking.fixed_order(np.array(scores)) == [3, 0, 5, 6, 4, 2, 1]  # by score (ties in order), NaN last
    assert ranking.fixed_order(np.array(scores), {1, 3}) == [0, 5, 6, 4, 2]
    assert ranking.rank(np.array([scores]), "source", {1}) == [[j for j in order if j != 1]]  # dropped after sorting
    ties = [0.5, 0.7, 0.5, 0.7]
    assert ranking.source_order(ties) == ranking.fixed_order(np.array(ties)) == [1, 3, 0, 2]  # ties: dataset order


def test_one_nan_full_score_is_enough_to_halve_the_agreement():
    """The mechanism behind the published cosine figures (research notes, section 7): a projection that agrees
    well with the full scores, but the full list of every test sample has one NaN (train row 570). The source's
    sort + drop-afterwards gives Kendall ~0.5; the fixed ranking and a NaN-free list give ~0.94."""
    rng = np.random.default_rng(0)
    full = rng.normal(0.05, 0.042, (20, 1000))
    projected = full + rng.normal(0, 0.004, full.shape)
    with_nan = full.copy()
    with_nan[:, 570] = np.nan

    def median_tau(scores, how):
        pairs = zip(ranking.rank(scores, how, {570}), ranking.rank(projected, how, {570}), strict=True)
        return np.median([pq.rank_agreement(a, b, 10)["kendall"] for a, b in pairs])

    assert median_tau(with_nan, "source") < 0.6
    assert median_tau(with_nan, "fixed") == median_tau(full, "source") > 0.9


# ------------------------------------------------------------------------------------------ the notebook's metrics

def test_rank_agreement_by_hand():
    # a = [0, 1, 2], b swaps the first two: b's ranks of a's items are [1, 0, 2]
    r = pq.rank_agreement([0, 1, 2], [1, 0, 2], k=2)
    assert r["kendall"] == pytest.approx(1 / 3)  # 2 concordant, 1 discordant pair
    assert r["spearman"] == pytest.approx(1 - 6 * 2 / (3 * 8))
    dcg = 0.5 / np.log2(2) + 1 / np.log2(3) + (1 / 3) / np.log2(4)  # b's order: item 1 (rel 1/2), 0 (1), 2 (1/3)
    idcg = 1 / np.log2(2) + 0.5 / np.log2(3) + (1 / 3) / np.log2(4)
    assert r["ndcg"] == pytest.approx(dcg / idcg)
    assert r["ndcg_at_k"] == pytest.approx((1 + 2 / np.log2(3)) / (2 + 1 / np.log2(3)))  # top 2 graded 2, 1; swapped
    assert pq.rank_agreement([0, 1, 2], [0, 1, 2], k=2) == {"kendall": 1.0, "spearman": 1.0, "ndcg": 1.0, "ndcg_at_k": 1.0}


def test_rank_agreement_is_the_notebook_s_compute_metric():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.permutation(50).tolist()
        b = [x for _, x in sorted(zip(np.arange(50) + rng.normal(0, 8, 50), a, strict=True))]
        r = pq.rank_agreement(a, b, 10)
        for m in ("kendall", "spearman", "ndcg"):
            assert r[m] == pytest.approx(compute_metric(a, b, m), abs=1e-12), m


def test_ndcg_at_k_by_hand():
    assert pq.ndcg_at_k(np.array([0, 1, 2, 3]), 2) == 1.0
    assert pq.ndcg_at_k(np.array([3, 2, 1, 0]), 2) == 0.0  # b's top 2 are a's last two
    assert pq.ndcg_at_k(np.array([2, 0, 1, 3]), 2) == pytest.approx((1 / np.log2(2) * 0 + 1 / np.log2(2) + 0) / (2 + 1 / np.log2(3)))


def test_permutation_tests_are_the_notebook_s():
    """perform_median_tests re-computed: one default_rng(42) per panel, metrics then consecutive pairs, 1000
    permutations of the pooled values, p = mean(|perm diff| >= |observed|)."""
    rng0 = np.random.default_rng(1)
    groups = [{m: list(rng0.normal(loc, 0.05, 100)) for m in pq.SOURCE_METRICS} for loc in (0.9, 0.89, 0.8, 0.79)]
    rng, expected = np.random.default_rng(42), {}
    for m in pq.SOURCE_METRICS:
        expected[m] = []
        for s1, s2 in zip(groups, groups[1:], strict=False):
            observed = np.median(s1[m]) - np.median(s2[m])
            combined, diffs = np.concatenate([s1[m], s2[m]]), []
            for _ in range(1000):
                perm = rng.permutation(combined)
                diffs.append(np.median(perm[:100]) - np.median(perm[100:]))
            expected[m].append(np.mean(np.abs(diffs) >= abs(observed)))
    assert pq.median_permutation_tests(groups, 1000, 42) == expected
    assert expected["kendall"][1] == 0.0 and expected["kendall"][0] > 0.05


def test_test_samples_in_the_notebook_s_file_order():
    assert pq.notebook_order(12) == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]


# ------------------------------------------------------------------------------------------ the recipes

@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Output root with the cut-down smoke extractions: full train and test, and the rademacher 204800 pair."""
    root = tmp_path_factory.mktemp("scoring")
    for exp, limit in ((TRAIN, N_TRAIN), (TEST, N_TEST), (PAIR[0], N_TRAIN), (PAIR[1], N_TEST)):
        assert main(["run", exp, "--profile", "smoke", "--output-dir", str(root), f"data.limit={limit}"]) == 0
    grads = {exp: store.load(next((root / exp).iterdir()))[0] for exp in (TRAIN, TEST, *PAIR)}
    return root, grads


def run_dir(root, experiment, run_id):
    return root / experiment / run_id


def test_score_gradients_writes_explain_py_s_lists(cli, extracted):
    root, grads = extracted
    train, test = grads[TRAIN], grads[TEST]
    assert train.dtype == torch.float16 and train[14].count_nonzero() == 0  # the excluded row, as in the source
    code, _, err = cli("run", "gradients/score-olmo2-7b-sft-full", "--profile", "smoke", "--output-dir", str(root),
                       *CUT, "top_k=null", "--run-id", "source")
    assert code == 0, err
    out = run_dir(root, "gradients/score-olmo2-7b-sft-full", "source")
    for method in ("dot", "cosine"):
        for i, expected in enumerate(explain_py(train, test, method)):
            got = json.loads((out / "scores" / method / f"test_{i}.json").read_text())
            assert [r["index"] for r in got] == [x["index"] for x in expected]
            assert [r["rank"] for r in got] == list(range(N_TRAIN))
            assert [r["score"] for r in got] == [None if np.isnan(x["score"]) else x["score"] for x in expected]
            assert [r["id"] for r in got if r["score"] is None] == ([EXCLUDED_ID] if method == "cosine" else [])
            assert got[0]["messages"] and got[0]["dataset"]  # the train row, as --mapped yes
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["cosine_nan_scores"], metrics["dot_nan_scores"]) == (N_TEST, 0)

    code, _, _ = cli("run", "gradients/score-olmo2-7b-sft-full", "--profile", "smoke", "--output-dir", str(root),
                     *CUT, "ranking=fixed", "--run-id", "fixed")
    assert code == 0
    fixed = json.loads((run_dir(root, "gradients/score-olmo2-7b-sft-full", "fixed") / "scores/cosine/test_1.json").read_text())
    cos = F.cosine_similarity(test[1:2].float(), train.float())
    assert [r["index"] for r in fixed] == torch.sort(cos, descending=True, stable=True).indices[:5].tolist()
    assert [r["score"] for r in fixed] == pytest.approx(torch.sort(cos, descending=True).values[:5].tolist(), rel=1e-5)


def test_score_gradients_reads_the_source_s_files(cli, extracted, tmp_path):
    """train_path/test_path: the source's own (n, 1, D) files; the same lists as from the runs."""
    root, grads = extracted
    for side, exp in (("train", TRAIN), ("test", TEST)):
        (tmp_path / side).mkdir()
        torch.save(grads[exp][:, None].clone(), tmp_path / side / f"0_{len(grads[exp])}")
    data = f'data={{name: "fixture:sampled-tulu", format: chat, limit: {N_TRAIN}}}'
    code, _, err = cli("run", "gradients/score-olmo2-7b-sft-full", "--profile", "smoke", "--output-dir", str(root),
                       "train=null", "test=null", f"train_path={tmp_path / 'train'}", f"test_path={tmp_path / 'test' / '0_3'}",
                       data, "--run-id", "files")
    assert code == 0, err
    ours = run_dir(root, "gradients/score-olmo2-7b-sft-full", "files") / "scores"
    code, _, _ = cli("run", "gradients/score-olmo2-7b-sft-full", "--profile", "smoke", "--output-dir", str(root), *CUT,
                     "--run-id", "runs")
    runs = run_dir(root, "gradients/score-olmo2-7b-sft-full", "runs") / "scores"
    for f in ("dot/test_0.json", "cosine/test_2.json"):
        assert json.loads((ours / f).read_text()) == json.loads((runs / f).read_text())
    code, _, err = cli("run", "gradients/score-olmo2-7b-sft-full", "--profile", "smoke", "--output-dir", str(root),
                       "train=null", f"train_path={tmp_path / 'train'}")
    assert code == 2 and "train_path needs data" in err


def test_projection_quality_end_to_end(cli, extracted):
    """An extracted pair and projections made here, against the notebook's metrics re-computed from the stored
    gradients; the extracted pair equals its re-projection; excluded row, p-values, report and plots."""
    root, grads = extracted
    here = "projections=[{type: normal, dim: 4096, projector: basic}, {type: normal, dim: 1024, projector: basic}, " \
           "{type: rademacher, dim: 1024, projector: basic}]"
    code, _, err = cli("run", "gradients/projection-quality-olmo2-7b-sft", "--profile", "smoke", "--output-dir",
                       str(root), *CUT, PROJECTED, here, "--run-id", "mixed")
    assert code == 0, err
    out = run_dir(root, "gradients/projection-quality-olmo2-7b-sft", "mixed")
    metrics, quality = (json.loads((out / f).read_text()) for f in ("metrics.json", "quality.json"))
    panels = {"normal": (4096, 1024), "rademacher": (4096, 1024)}
    expected = {f"{f}_{t}_{d}_{m}_median" for f in ("dot", "cosine") for t, dims in panels.items() for d in dims
                for m in ("kendall", "spearman", "ndcg", "ndcg_at_10")}
    expected |= {f"{f}_{t}_{m}_p_4096_vs_1024" for f in ("dot", "cosine") for t in panels for m in pq.SOURCE_METRICS}
    expected |= {f"full_{a}_vs_{t}_{d}_{b}_{m}_median" for a, b in (("dot", "cosine"), ("cosine", "dot"))
                 for t, dims in panels.items() for d in dims for m in pq.SOURCE_METRICS}
    expected |= {f"{f}_full_score_std_mean" for f in ("dot", "cosine")}
    expected |= {f"{f}_{t}_{d}_score_std_mean" for f in ("dot", "cosine") for t, dims in panels.items() for d in dims}
    expected |= {"dot_vs_cosine_full_spearman_mean"} | {f"dot_vs_cosine_{t}_{d}_spearman_mean"
                                                         for t, dims in panels.items() for d in dims}
    assert set(metrics) - {"reference"} == expected
    assert quality["excluded"] == [14] and quality["test_order"] == [0, 1, 2]
    assert quality["settings"]["rademacher_4096"]["extracted"]["dim"] == 4096
    assert quality["settings"]["normal_1024"]["projected_here"]["dim"] == 1024

    # the notebook's numbers for normal 1024, re-computed from the stored gradients
    train, test = grads[TRAIN], grads[TEST]
    proj = BasicProjector(train.shape[1], 1024, 42, ProjectionType.normal, "cpu", block_size=1024)
    ptrain, ptest = proj.project(train, model_id=0), proj.project(test, model_id=0)
    for method in ("dot", "cosine"):
        full = [[x["index"] for x in items if x["index"] != 14] for items in explain_py(train, test, method)]
        projected = [[x["index"] for x in items if x["index"] != 14] for items in explain_py(ptrain, ptest, method)]
        for m in pq.SOURCE_METRICS:
            values = [compute_metric(a, b, m) for a, b in zip(full, projected, strict=True)]
            assert quality["per_test_sample"]["normal_1024"][method][m] == pytest.approx(values, abs=1e-9), (method, m)
            assert metrics[f"{method}_normal_1024_{m}_median"] == pytest.approx(np.median(values), abs=1e-9)
        stds = [np.std([x["score"] for x in items if x["index"] != 14]) for items in explain_py(ptrain, ptest, method)]
        assert metrics[f"{method}_normal_1024_score_std_mean"] == pytest.approx(np.mean(stds), rel=1e-6)
    per = quality["per_test_sample"]["normal_4096"]["dot"], quality["per_test_sample"]["normal_1024"]["dot"]
    assert metrics["dot_normal_kendall_p_4096_vs_1024"] == pq.median_permutation_tests(list(per), 200, 42)["kendall"][0]

    # the extracted rademacher 4096 pair against the same projection made here: the same rankings
    code, _, _ = cli("run", "gradients/projection-quality-olmo2-7b-sft", "--profile", "smoke", "--output-dir",
                     str(root), *CUT, "projected=[]", "projections=[{type: rademacher, dim: 4096, projector: basic}]",
                     "--run-id", "here")
    assert code == 0
    again = json.loads((run_dir(root, "gradients/projection-quality-olmo2-7b-sft", "here") / "metrics.json").read_text())
    for m in ("kendall", "spearman", "ndcg"):
        for f in ("dot", "cosine"):
            assert again[f"{f}_rademacher_4096_{m}_median"] == pytest.approx(metrics[f"{f}_rademacher_4096_{m}_median"],
                                                                             abs=0.02)
    for f in ("quality.png", "cross.png", "dot_vs_cosine.png"):
        assert (out / f).read_bytes()[:4] == b"\x89PNG"
    report = (out / "quality.md").read_text()
    assert "## dot, normal projection" in report and "| 4,096 |" in report and "open_orca_t0.1598436" in report


def test_projection_quality_refuses_a_setting_given_twice(cli, extracted):
    root, _ = extracted
    code, _, err = cli("run", "gradients/projection-quality-olmo2-7b-sft", "--profile", "smoke", "--output-dir",
                       str(root), *CUT, PROJECTED, "projections=[{type: rademacher, dim: 4096, projector: basic}]")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "a projection (type, dim) is given twice" in err
    code, _, err = cli("run", "gradients/projection-quality-olmo2-7b-sft", "--profile", "smoke", "--output-dir",
                       str(root), "projected=[]")
    assert code == 2 and "give projected (extracted projection runs) or projections" in err
