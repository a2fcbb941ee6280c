"""Named recipes (config.RECIPES, `--recipe`): one flag gives their values, options beside it and
search's saved values win over it, the name is kept in the config, a bad name is one line; and the
EfficientNet-Lite2 backbone a recipe may name is installed and built as published."""
import json

import pytest
import torch

from flower_classifier.cli import main
from conftest import QUIET
from flower_classifier import training
from flower_classifier.checkpoint import load_checkpoint
from flower_classifier.config import FIELDS, RECIPES, TrainConfig, recipe_problem


class Started(Exception):
    """Raised by the stand-in for run_training: the config train.py would have trained with."""


@pytest.fixture
def started(monkeypatch):
    def fake(config, *args, **kwargs):
        raise Started(config)
    monkeypatch.setattr("flower_classifier.training.run_training", fake)

    def run(argv) -> TrainConfig:
        with pytest.raises(Started) as caught:
            main(["train", *argv])
        return caught.value.args[0]
    return run


def another_value() -> tuple[str, float]:
    """A number option the best recipe sets, and a valid value for it other than the recipe's."""
    key, value = next((k, v) for k, v in RECIPES["best"].items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    return key, type(value)(value / 2)


def test_every_recipe_sets_only_valid_options_and_best_changes_something():
    assert all(recipe_problem(name) is None for name in RECIPES)
    assert RECIPES["best"] and RECIPES["plain"] == {}
    best = TrainConfig.of_recipe("best")
    assert best.recipe == "best"
    assert all(getattr(best, k) == (tuple(v) if isinstance(v, list) else v) for k, v in RECIPES["best"].items())
    assert best.to_dict()["recipe"] == "best" and TrainConfig.from_dict(best.to_dict()) == best


def test_the_best_recipe_trains_end_to_end_with_its_fine_tuned_blocks(data, tmp_path):
    """The recipe's options work together in a whole run (on the tiny backbone named beside it): the
    checkpoint keeps the recipe's name and values and, when it fine-tunes, the trained blocks."""
    # The tiny backbone has 2 blocks: the recipe's fine-tuning depth is capped there, still fine-tuning.
    finetune = min(RECIPES["best"].get("finetune", 0), 2)
    config = TrainConfig.of_recipe("best", arch="tiny", epochs=1, num_workers=0, batch_size=4, hidden_units=[16],
                                   finetune=finetune)
    result = training.run_training(config, data, save_dir=tmp_path / "run", cache_dir=tmp_path / "cache", **QUIET)
    ckpt = load_checkpoint(result.best_path)
    assert ckpt.config.recipe == "best" and ckpt.config.label_smoothing == config.label_smoothing
    assert ckpt.config.finetune == config.finetune and bool(ckpt.top_state) == (config.finetune > 0)


def test_a_bad_recipe_entry_is_named(monkeypatch):
    monkeypatch.setitem(RECIPES, "broken", {"epochs": 0})
    assert "recipe broken: epochs" in recipe_problem("broken")
    monkeypatch.setitem(RECIPES, "broken", {"num_workers": 1})  # its flag is --workers, shared with other commands
    assert "'num_workers' is not an option" in recipe_problem("broken")


def test_recipe_flag_gives_its_values_and_flags_beside_it_win(started, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no hyperparameters.json here
    plain = started([str(data), "--arch", "tiny"])  # vgg16, the built-in default, would need a download
    best = started([str(data), "--recipe", "best"])
    assert plain.recipe == "plain" and best.recipe == "best"
    for key, value in RECIPES["best"].items():
        assert getattr(best, key) == TrainConfig.of_recipe("best").__getattribute__(key) != getattr(plain, key)
    key, value = another_value()
    mine = started([str(data), "--recipe", "best", f"--{key}", str(value)])
    assert getattr(mine, key) == value and mine.recipe == "best"


def test_saved_search_values_win_over_the_recipe(started, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    key, value = another_value()
    (tmp_path / "hyperparameters.json").write_text(json.dumps({key: value}))
    assert getattr(started([str(data), "--recipe", "best"]), key) == value


def test_an_unknown_recipe_is_one_line(data, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", str(data), "--recipe", "fastest"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and "--recipe" in err[-1] and "best" in err[-1]
    with pytest.raises(Exception, match="recipe must be one of"):
        TrainConfig.of_recipe("fastest")


def test_train_help_shows_what_each_recipe_sets(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in RECIPES["best"]:
        assert f"--{key}" in text.split("--recipe", 1)[1]
    assert FIELDS["recipe"].default == TrainConfig().recipe


def test_efficientnet_lite2_is_installed_and_built_as_published():
    from flower_classifier.backbones import build_backbone

    backbone = build_backbone("efficientnet_lite2")  # the real weights: a package of requirements.txt
    p = backbone.preprocessing
    assert p.input_size == 260 and tuple(p.mean) == tuple(p.std) == (0.5, 0.5, 0.5)
    torch.manual_seed(0)
    with torch.inference_mode():
        features = backbone.module(torch.randn(2, 3, 260, 260))
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])  # pretrained, not collapsed to one vector
