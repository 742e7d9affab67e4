"""Configs: recipes, dotted overrides, and errors that name key, value and type."""

from __future__ import annotations

import pytest
import yaml

from aigc.config import RECIPES_DIR, Config, TrainConfig, apply_overrides, from_dict, load_config
from aigc.errors import ConfigError

RECIPE = "configs/gpt-pydoc-char.yaml"


def test_recipe_loads_with_types():
    cfg = load_config(RECIPE)
    assert isinstance(cfg, Config)
    assert cfg.family == "gpt"
    assert cfg.model.n_layer == 4 and isinstance(cfg.train.lr, float)
    assert cfg.data.path is None


def test_dotted_overrides_are_typed():
    cfg = load_config(
        RECIPE, ["train.max_steps=2000", "model.n_layer=6", "data.path=my_corpus/", "train.lr=3e-4"]
    )
    assert cfg.train.max_steps == 2000
    assert cfg.model.n_layer == 6
    assert cfg.data.path == "my_corpus/"
    assert cfg.train.lr == pytest.approx(3e-4)


def test_int_accepted_where_float_expected():
    assert from_dict(TrainConfig, {"lr": 1}).lr == 1.0


def test_unknown_key_names_closest_valid_one():
    with pytest.raises(ConfigError, match=r"'train\.max_step'.*did you mean train\.max_steps"):
        load_config(RECIPE, ["train.max_step=5"])
    with pytest.raises(ConfigError, match=r"'model\.n_layers'.*model\.n_layer"):
        load_config(RECIPE, ["model.n_layers=5"])


def test_wrong_type_names_key_value_and_expected_type():
    with pytest.raises(ConfigError, match=r"train\.max_steps='many'.*expected int"):
        load_config(RECIPE, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"train\.deterministic=3.*expected bool"):
        load_config(RECIPE, ["train.deterministic=3"])


def test_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"data\.tokenizer='word'.*'char' \| 'bpe'"):
        load_config(RECIPE, ["data.tokenizer=word"])


def test_unknown_family_and_section():
    with pytest.raises(ConfigError, match=r"family='gtp'.*did you mean 'gpt'"):
        load_config({"family": "gtp"})
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean train"):
        load_config({"family": "gpt", "trian": {}})


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.max_steps"])


def test_model_validation_runs_on_load():
    with pytest.raises(ConfigError, match="n_embd"):
        load_config(RECIPE, ["model.n_embd=130", "model.n_head=4"])


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(RECIPE, ["train.max_steps=7"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()
    assert yaml.safe_load(path.read_text())["train"]["max_steps"] == 7


def test_shipped_recipes_load_by_name_and_validate():
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert {"gpt-pydoc-char", "cgan-digits", "dcgan-shapes", "wgangp-digits"} <= set(names)
    for name in names:
        cfg = load_config(name)  # by name, as aigc.train("cgan-digits") does
        assert cfg.to_dict() == load_config(RECIPES_DIR / f"{name}.yaml").to_dict()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no-such-recipe")
