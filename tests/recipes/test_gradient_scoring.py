"""score-gradients and projection-quality recipes on the smoke profiles, checked against direct computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from llmrepro.gradients import store
from llmrepro.recipes.projection_quality import agreement, ndcg_at_k

SMALL = ["train.overrides=[data.limit=10]", "test.overrides=[data.limit=3]"]


@pytest.fixture
def extracted(cli, tmp_path):
    """The extraction runs the scoring recipes read: their smoke profiles, cut to 10 train and 3 test rows."""
    for exp, limit in (("gradients/olmo2-7b-sft-full-train", 10), ("gradients/olmo2-7b-sft-full-test", 3)):
        assert cli("run", exp, "--profile", "smoke", "--output-dir", str(tmp_path), f"data.limit={limit}")[0] == 0


def test_ndcg_by_hand():
    full = np.array([4.0, 3.0, 2.0, 1.0])
    assert ndcg_at_k(full, full, 2) == 1.0
    # projected top 2 = items 3, 2 (relevance 0, 0) -> 0; items 1, 0 swapped -> (1 + 2/log2 3) / (2 + 1/log2 3)
    assert ndcg_at_k(full, -full, 2) == 0.0
    swapped = np.array([3.0, 4.0, 2.0, 1.0])
    assert ndcg_at_k(full, swapped, 2) == pytest.approx((1 + 2 / np.log2(3)) / (2 + 1 / np.log2(3)))
    a = agreement(full, swapped, 2)
    assert a["spearman"] == pytest.approx(stats.spearmanr(full, swapped).statistic)
    assert a["kendall"] == pytest.approx(2 / 3)


def test_score_gradients_ranks_by_dot_and_cosine(cli, tmp_path, extracted):
    code, out, _ = cli("run", "gradients/score-olmo2-7b-sft-full", "--profile", "smoke", "--output-dir", str(tmp_path),
                       *SMALL)
    assert code == 0
    run = tmp_path / "gradients" / "score-olmo2-7b-sft-full"
    (score_dir,) = run.iterdir()
    train, _, _ = store.load(next((tmp_path / "gradients" / "olmo2-7b-sft-full-train").iterdir()))
    test, _, _ = store.load(next((tmp_path / "gradients" / "olmo2-7b-sft-full-test").iterdir()))
    assert sorted(p.name for p in (score_dir / "scores" / "dot").iterdir()) == ["test_0.json", "test_1.json", "test_2.json"]
    ranked = json.loads((score_dir / "scores" / "dot" / "test_1.json").read_text())
    dots = test[1] @ train.T
    assert [r["index"] for r in ranked] == dots.argsort(descending=True)[:5].tolist()
    assert [r["score"] for r in ranked] == pytest.approx(dots.sort(descending=True).values[:5].tolist(), rel=1e-5)
    assert ranked[0]["id"] == f"lima_{ranked[0]['index']}" and ranked[0]["messages"]  # the sample's row
    cos = json.loads((score_dir / "scores" / "cosine" / "test_0.json").read_text())
    expected = torch.nn.functional.cosine_similarity(test[0][None], train).max().item()
    assert cos[0]["score"] == pytest.approx(expected, rel=1e-5)


def test_projection_quality_table_plot_and_metrics(cli, tmp_path, extracted):
    code, _, _ = cli("run", "gradients/projection-quality-olmo2-7b-sft", "--profile", "smoke", "--output-dir",
                     str(tmp_path), *SMALL)
    assert code == 0
    (run,) = (tmp_path / "gradients" / "projection-quality-olmo2-7b-sft").iterdir()
    assert (run / "quality.png").read_bytes()[:4] == b"\x89PNG"
    table = (run / "quality.md").read_text().splitlines()
    assert table[2].startswith("| projection | dim | spearman") and len(table) == 4 + 4
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {f"{t}_{d}_{m}" for t in ("normal", "rademacher") for d in (64, 512)
                            for m in ("spearman", "kendall", "ndcg")}
    # 512 dimensions of a 4096-dimensional gradient preserve the ranking well
    assert metrics["normal_512_spearman"] > 0.9 and metrics["rademacher_512_spearman"] > 0.9
    per = json.loads((run / "quality.json").read_text())["per_test_sample"]
    assert len(per["normal_64"]) == 3 and all(-1 <= r["kendall"] <= 1 for r in per["normal_64"])
