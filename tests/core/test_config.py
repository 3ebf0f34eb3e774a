"""Config resolution: profiles, dotted overrides, and validation errors that name the key path."""

from __future__ import annotations

import pytest

from llmrepro.core import catalog, config
from llmrepro.core.errors import UserError

EXP = "instruct/dolly-pythia-2.8b"


def test_deep_merge_merges_sections_and_replaces_leaves():
    base = {"model": {"name": "a", "dtype": "bfloat16"}, "lr": 1, "tags": [1, 2]}
    out = config.deep_merge(base, {"model": {"name": "b"}, "tags": [3]})
    assert out == {"model": {"name": "b", "dtype": "bfloat16"}, "lr": 1, "tags": [3]}
    assert base["model"]["name"] == "a"  # not mutated


def test_overrides_are_typed_yaml_scalars():
    out = config.apply_overrides({"train": {"lr": 1}}, ["train.lr=5e-6", "train.bf16=true", "model.name=tiny-llama",
                                                       "train.max_steps=3", "x=null"])
    assert out == {"train": {"lr": 5e-6, "bf16": True, "max_steps": 3}, "model": {"name": "tiny-llama"}, "x": None}


@pytest.mark.parametrize("bad", ["nokey", "=3", "a..b=1", ".a=1"])
def test_malformed_override(bad):
    with pytest.raises(UserError, match="expected dotted key=value"):
        config.apply_overrides({}, [bad])


def test_override_into_a_scalar_is_rejected():
    with pytest.raises(UserError, match=r"params.test_size is not a section"):
        config.apply_overrides({"test_size": 3}, ["test_size.x=1"])


CATALOG = """# llmrepro run fam/x
recipe: instruct-sft
source: instruction-tuning
description: d
measures: m
params:
  model: {name: EleutherAI/pythia-2.8b, dtype: bfloat16}
  data: {name: databricks/databricks-dolly-15k, format: dolly}
  test_size: 200
  train: {learning_rate: 5.0e-6, batch_size: 6, warmup_steps: 50}
profiles:
  smoke:
    model: {name: tiny-pythia}
    train: {batch_size: 2}
"""


def test_profile_is_merged_over_params(tmp_path):
    (tmp_path / "fam").mkdir()
    (tmp_path / "fam" / "x.yaml").write_text(CATALOG)
    exp = catalog.load("fam/x", tmp_path)
    cfg = exp.resolve("smoke")
    assert cfg.model.name == "tiny-pythia" and cfg.model.dtype == "bfloat16"  # the profile's name, the base's dtype
    assert cfg.data.format == "dolly" and cfg.train.batch_size == 2 and cfg.train.learning_rate == 5e-6
    base = exp.resolve()
    assert base.model.name == "EleutherAI/pythia-2.8b" and base.train.batch_size == 6 and base.test_size == 200
    assert exp.resolve("smoke", ["train.batch_size=3", "model.dtype=float32"]).train.batch_size == 3


@pytest.mark.parametrize("override, message", [
    (["train.lerning_rate=1"], "params.train.lerning_rate: unknown key"),
    (["train.batch_size=many"], "params.train.batch_size: Input should be a valid integer"),
    (["test_size=0"], "params.test_size: Input should be greater than or equal to 1 (got 0)"),
    (["model.dtype=float8"], "params.model.dtype: Input should be 'float32', 'float16', 'bfloat16' or 'auto'"),
    (["data.format=preference"], "params.data: Value error, instruct-sft needs instruction data"),
    (["data.format=alpaca", "category_filter=qa_only"], "category_filter applies to Dolly data only"),
])
def test_invalid_values_name_the_key_path(override, message):
    with pytest.raises(UserError) as err:
        catalog.load(EXP).resolve("smoke", override)
    assert message in str(err.value)
    assert str(err.value).startswith(f"{EXP} (profile smoke): invalid config:")


def test_all_errors_reported_at_once():
    with pytest.raises(UserError) as err:
        catalog.load(EXP).resolve("smoke", ["train.bogus=1", "test_size=-1"])
    assert "params.train.bogus: unknown key" in str(err.value) and "params.test_size" in str(err.value)


def test_unknown_experiment_and_profile():
    with pytest.raises(UserError, match=r"unknown experiment 'instruct/dolly-pythia-2.8'\. Did you mean 'instruct/dolly-pythia-2.8b'\?"):
        catalog.load("instruct/dolly-pythia-2.8")
    with pytest.raises(UserError, match=r"has no profile 'tiny' \(profiles: .*smoke"):
        catalog.load(EXP).resolve("tiny")


def test_experiment_file_schema(tmp_path):
    (tmp_path / "fam").mkdir()
    (tmp_path / "fam" / "x.yaml").write_text("recipe: instruct-sft\nsource: nowhere\ndescription: d\nmeasures: m\n")
    with pytest.raises(UserError, match="unknown source 'nowhere'"):
        catalog.load("fam/x", tmp_path)
    (tmp_path / "fam" / "x.yaml").write_text("recipe: instruct-sft\nsource: reprpo\ndescription: d\nmeasures: m\nparms: {}\n")
    with pytest.raises(UserError, match=r"fam/x.parms: unknown key"):
        catalog.load("fam/x", tmp_path)
    (tmp_path / "fam" / "x.yaml").write_text("recipe: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        catalog.load("fam/x", tmp_path)


def test_every_experiment_in_the_tree_validates_with_every_profile():
    """Walks the whole experiments/ tree (not only the top folder) and resolves each profile."""
    exps = catalog.load_all()
    assert {e.name for e in exps} == set(catalog.names())
    assert len(exps) == len(list(catalog.experiments_dir().rglob("*.yaml")))
    for exp in exps:
        assert "smoke" in exp.spec.profiles, f"{exp.name} has no smoke profile"
        for profile in [None, *exp.spec.profiles]:
            exp.resolve(profile)
        header = exp.path.read_text().splitlines()[0]
        assert (header + " ").startswith(f"# llmrepro run {exp.name} "), f"{exp.path}: first line must be the command"


def test_config_hash_is_stable_and_order_independent():
    a = config.config_hash("r", {"a": 1, "b": {"c": 2, "d": 3}})
    assert a == config.config_hash("r", {"b": {"d": 3, "c": 2}, "a": 1})
    assert a != config.config_hash("r", {"a": 1, "b": {"c": 2, "d": 4}})
