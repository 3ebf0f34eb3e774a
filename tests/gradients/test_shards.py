"""Shards: the source's (n, 1, D) layout and a reader for its files, atomic writes with markers, the last short
shard, resume, shard ranges + merge, checkpoint order and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmrepro.core.errors import UserError
from llmrepro.gradients import shards, store
from llmrepro.recipes import extract_gradients

EXP = "gradients/olmo2-7b-sft-full-train"
SMALL = ["data.limit=10", "gradients_per_file=4"]  # shards 0_4, 4_8 and the short 8_10


def test_ranges_keep_the_last_short_shard():
    assert shards.ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shards.ranges(8, 4) == [(0, 4), (4, 8)]


def test_save_is_atomic_and_marked(tmp_path):
    t = torch.arange(6.0).reshape(2, 3)
    shards.write(tmp_path, 0, 2, t)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0_2", "0_2.done"]
    marker = json.loads((tmp_path / "0_2.done").read_text())
    assert marker["rows"] == 2 and marker["shape"] == [2, 3] and marker["bytes"] == (tmp_path / "0_2").stat().st_size
    assert shards.is_done(tmp_path, 0, 2) and torch.equal(shards.read(tmp_path, 0, 2), t)
    (tmp_path / "0_2").write_bytes(b"truncated")  # a file that does not match its marker is unfinished
    assert not shards.is_done(tmp_path, 0, 2)
    (tmp_path / "2_4").write_bytes(b"x")  # no marker: unfinished
    with pytest.raises(UserError, match="2 of 2 shards missing or unfinished"):
        shards.load_all(tmp_path, 4, 2)


def test_extraction_stores_the_source_layout(cli, tmp_path):
    """Each shard is an (n, 1, D) tensor as the source's torch.stack of (1, D) rows; the store reads (N, D)."""
    assert cli("run", EXP, "--profile", "smoke", "--output-dir", str(tmp_path), *SMALL)[0] == 0
    run = only_run(tmp_path)
    directory = run / "gradients/full/tiny-olmo2/sampled-tulu/train/main"
    raw = shards.read(directory, 8, 10)
    assert raw.shape == (2, 1, 128 * 64) and raw.dtype == torch.float16  # the source's dtype for full gradients
    assert json.loads((directory / "8_10.done").read_text())["shape"] == [2, 1, 128 * 64]
    grads, _, meta = store.load(run)
    assert grads.shape == (10, 128 * 64) and torch.equal(grads[8:], raw[:, 0])
    assert meta["layout"] == "(n, 1, D)" and meta["template"] == "source" and meta["padding"] == "longest"
    assert torch.equal(store.load_source(directory), grads)  # our shard directory reads as the source's too


def test_reader_of_the_source_files(tmp_path):
    """The source's extract_gradients.py wrote plain torch.save'd (n, 1, D) files named {start}_{end}, no markers."""
    parts = [torch.randn(4, 1, 6).half(), torch.randn(4, 1, 6).half()]
    for (start, end), t in zip([(0, 4), (4, 8)], parts, strict=True):
        torch.save(t, tmp_path / f"{start}_{end}")
    (tmp_path / "notes.txt").write_text("not a gradient file")
    expected = torch.cat(parts)[:, 0]
    assert torch.equal(store.load_source(tmp_path), expected)
    assert torch.equal(store.load_source(tmp_path / "4_8"), parts[1][:, 0])
    (tmp_path / "0_4").rename(tmp_path / "1_4")
    with pytest.raises(UserError, match=r"do not cover samples 0\.\.0 \(next file: 1_4\)"):
        store.load_source(tmp_path)
    torch.save(torch.zeros(3, 1, 6), tmp_path / "0_1")
    with pytest.raises(UserError, match=r"0_1: holds a \(3, 6\) tensor, not the \(1, 1, D\) its name says"):
        store.load_source(tmp_path)
    (tmp_path / "0_1").write_bytes(b"garbage")
    with pytest.raises(UserError, match="0_1: cannot read as torch.save'd gradients"):
        store.load_source(tmp_path)
    with pytest.raises(UserError, match="source gradients not found"):
        store.load_source(tmp_path / "missing")


def test_mlm_extraction_with_the_source_padding(cli, tmp_path):
    """paradigm mlm on a BERT with padding: max_length: every sample is max_length long and attends to its
    padding, as the source ran RoBERTa, so the padding positions get gradients too."""
    args = ["--profile", "smoke", "--output-dir", str(tmp_path), "model.name=tiny-bert", "paradigm=mlm",
            "data.limit=4"]
    assert cli("run", EXP, *args, "padding=max_length", "--run-id", "source")[0] == 0
    assert cli("run", EXP, *args, "--run-id", "longest")[0] == 0
    source, _, _ = store.load(tmp_path / EXP / "source")
    longest, _, _ = store.load(tmp_path / EXP / "longest")
    assert source.shape == longest.shape == (4, 128 * 64)
    assert not torch.equal(source, longest)
    pad_grads = longest.view(4, 128, 64).abs().sum(-1) == 0
    assert pad_grads.any() and (source.view(4, 128, 64).abs().sum(-1)[pad_grads] > 0).any()


def files(run_dir: Path) -> dict[str, bytes]:
    root = run_dir / "gradients"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def only_run(root: Path, experiment: str = EXP) -> Path:
    (run,) = [p for p in (root / experiment).iterdir() if not p.name.endswith(".partial")]
    return run


def test_interrupted_extraction_resumes_to_the_same_files(cli, tmp_path, monkeypatch):
    assert cli("run", EXP, "--profile", "smoke", "--output-dir", str(tmp_path / "a"), *SMALL)[0] == 0
    reference = files(only_run(tmp_path / "a"))
    assert sorted(k for k in reference if not k.endswith((".done", ".json"))) == [
        "full/tiny-olmo2/sampled-tulu/train/main/0_4", "full/tiny-olmo2/sampled-tulu/train/main/4_8",
        "full/tiny-olmo2/sampled-tulu/train/main/8_10"]

    real, calls = extract_gradients.extract_range, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_gradients, "extract_range", interrupted)
    assert cli("run", EXP, "--profile", "smoke", "--output-dir", str(tmp_path / "b"), *SMALL)[0] == 130
    (partial,) = (tmp_path / "b" / EXP).glob("*.partial")
    assert sorted(p.name for p in partial.rglob("*_*") if p.is_file()) == ["0_4", "0_4.done"]
    monkeypatch.setattr(extract_gradients, "extract_range", real)
    assert cli("run", EXP, "--profile", "smoke", "--output-dir", str(tmp_path / "b"), "--resume", *SMALL)[0] == 0
    resumed = only_run(tmp_path / "b")
    assert json.loads((resumed / "metrics.json").read_text())["shards_skipped"] == 1
    assert files(resumed) == reference


def test_shard_ranges_merge_to_the_single_process_result(cli, tmp_path):
    out = ["--profile", "smoke", "--output-dir", str(tmp_path / "array"), *SMALL]
    assert cli("run", EXP, "--profile", "smoke", "--output-dir", str(tmp_path / "one"), *SMALL)[0] == 0
    for task, (start, end) in enumerate([(0, 1), (1, 2), (2, 3)]):
        assert cli("run", EXP, *out, f"shard_start={start}", f"shard_end={end}", "--run-id", f"task{task}")[0] == 0
    assert cli("run", EXP, *out, "merge=true", "--run-id", "merged")[0] == 0
    merged, single = tmp_path / "array" / EXP / "merged", only_run(tmp_path / "one")
    assert files(merged) == files(single)
    assert (merged / "gradients/full/tiny-olmo2/sampled-tulu/train/main/8_10").stat().st_nlink == 2  # hard-linked
    m = json.loads((merged / "metrics.json").read_text())
    assert m["grad_norm_mean"] == pytest.approx(json.loads((single / "metrics.json").read_text())["grad_norm_mean"])


def test_merge_reports_missing_shards(cli, tmp_path):
    out = ["--profile", "smoke", "--output-dir", str(tmp_path), *SMALL]
    assert cli("run", EXP, *out, "shard_start=1", "shard_end=2", "--run-id", "task1")[0] == 0
    code, _, err = cli("run", EXP, *out, "merge=true")
    assert code == 2
    assert err.strip() == ("llmrepro: error: merge: 2 of 3 shards are not finished in any of 1 run(s): 0_4, 8_10; "
                           "run those shard ranges first")
    assert [p.name for p in (tmp_path / EXP).iterdir()] == ["task1"]  # the failed merge left nothing


def test_store_mean_is_the_mean_of_the_stored_gradients(cli, tmp_path):
    out = ["--profile", "smoke", "--output-dir", str(tmp_path), *SMALL]
    assert cli("run", EXP, *out, "--run-id", "store")[0] == 0
    assert cli("run", EXP, *out, "mode=store_mean", "--run-id", "mean")[0] == 0
    grads, _, _ = store.load(tmp_path / EXP / "store")
    (mean_file,) = (tmp_path / EXP / "mean" / "gradients").rglob("mean")
    torch.testing.assert_close(torch.load(mean_file), grads.float().mean(dim=0, keepdim=True), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("overrides", "message"), [
    (["checkpoint=3"], "checkpoint index 3 out of range (1 checkpoints)"),
    (["checkpoint=2", "revisions=[step0,step1]"], "checkpoint index 2 out of range (2 checkpoints)"),
    (["paradigm=foo"], "params.paradigm: Input should be 'pre', 'mlm' or 'sft'"),
])
def test_bad_options_fail_with_one_line(cli, tmp_path, overrides, message):
    code, _, err = cli("run", EXP, "--profile", "smoke", "--output-dir", str(tmp_path), *overrides)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / EXP).exists()


def test_hub_checkpoint_index_offline_fails_clearly():
    cfg = extract_gradients.Config.model_validate({
        "model": {"name": "allenai/OLMo-2-1124-7B-SFT"}, "data": {"name": "x/y", "format": "chat"}})
    with pytest.raises(UserError, match="needs the hub's list of revisions"):
        extract_gradients.resolve_checkpoint(cfg)
    assert extract_gradients.resolve_checkpoint(cfg.model_copy(update={"checkpoint": "stage1-step1000"})) == "stage1-step1000"


def test_hub_revisions_are_in_the_source_s_checkpoint_order():
    """util.get_checkpoints_olmo: stage1 branches by step, stage2 by (ingredient, step), main; nothing else."""
    names = ["main", "stage2-ingredient2-step10-tokens1B", "stage1-step1000-tokens5B", "stage1-step200-tokens1B",
             "stage2-ingredient1-step20-tokens2B", "experimental-branch"]
    assert extract_gradients.order_revisions(names) == [
        "stage1-step200-tokens1B", "stage1-step1000-tokens5B", "stage2-ingredient1-step20-tokens2B",
        "stage2-ingredient2-step10-tokens1B", "main"]
    assert extract_gradients.order_revisions(["main"]) == ["main"]  # OLMo-2-1124-7B-SFT: checkpoint 0 is main
