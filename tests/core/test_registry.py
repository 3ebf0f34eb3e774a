"""The recipe registry: a literal list of records whose modules keep the recipe contract, and whose declared
dependencies match the runs their experiments' configs read."""

from __future__ import annotations

import inspect

import pytest

from llmrepro.core import catalog, registry
from llmrepro.core.config import RecipeConfig
from llmrepro.core.errors import UserError


@pytest.mark.parametrize("record", registry.RECIPES, ids=lambda r: r.name)
def test_each_record_points_at_a_recipe_module(record):
    module = record.load()
    assert issubclass(module.Config, RecipeConfig)
    assert list(inspect.signature(module.run).parameters) == ["cfg", "ctx"]
    assert record.description and len(record.description) <= 110 and "\n" not in record.description
    assert not {"NAME", "DESCRIPTION", "SUPPORTS_RESUME", "SUPPORTS_DISTRIBUTED"} & set(vars(module)), \
        "what a recipe is lives in its registry record, not in module constants"
    assert set(record.depends_on) <= set(registry.names())


def test_names_are_unique_and_unknown_ones_are_one_line_errors():
    assert len(registry.names()) == len(set(registry.names()))
    with pytest.raises(UserError, match=r"^unknown recipe 'instruct-stf'. Did you mean 'instruct-sft'\? Available: "):
        registry.get("instruct-stf")


@pytest.mark.parametrize("name", catalog.names())
def test_experiments_read_only_runs_their_recipe_declares(name):
    exp = catalog.load(name)
    declared = set(registry.get(exp.spec.recipe).depends_on)
    for profile in [None, *exp.spec.profiles]:
        for ref in exp.resolve(profile).dependencies():
            assert catalog.load(ref.experiment).spec.recipe in declared, (name, profile, ref.experiment)


def test_list_can_show_the_descriptions(cli):
    code, out, _ = cli("recipes")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["recipe", "resume"] and len(lines) == 2 + len(registry.RECIPES)
    sft = next(line for line in lines if line.startswith("instruct-sft "))
    assert "yes" in sft and registry.get("instruct-sft").description in sft
