"""Hyperparameter search: a few trials on generated data, its file feeds train.py's defaults."""
import json
import random

import pytest

from conftest import TWELVE, make_dataset
from flower_classifier.checkpoint import load_checkpoint
from flower_classifier.cli import main, single_command_main
from flower_classifier.config import TrainConfig, load_defaults
from flower_classifier.search import SEARCHED, sample_params


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("search") / "flowers", TWELVE[:4], per_split={"train": 4, "valid": 2})


def test_samples_stay_in_the_search_space_and_make_valid_configs():
    rng = random.Random(0)
    for _ in range(50):
        params = sample_params(rng)
        assert set(params) == set(SEARCHED)
        assert 1e-4 <= params["learning_rate"] <= 1e-2
        TrainConfig(**params)  # every sample passes the config's own checks


def test_search_writes_defaults_that_train_then_uses(data, tmp_path, capsys):
    out = tmp_path / "hp.json"
    assert main(["search", str(data), "--trials", "3", "--arch", "tiny", "--workers", "0", "--quiet",
                 "--out", str(out), "--cache_dir", str(tmp_path / "c")]) == 0
    printed = capsys.readouterr().out
    assert "Best of 3 trials" in printed and str(out) in printed
    saved = json.loads(out.read_text())
    assert sorted(t["trial"] for t in saved["trials"]) == [0, 1, 2]
    best = saved["hyperparameters"]
    assert set(SEARCHED) <= set(best) and best["arch"] == "tiny"
    assert saved["valid_accuracy"] == max(t["valid_accuracy"] for t in saved["trials"])
    trial0 = next(t for t in saved["trials"] if t["trial"] == 0)
    assert trial0["params"]["learning_rate"] == TrainConfig().learning_rate  # the defaults are trial 0
    assert load_defaults(out) == best

    # train.py with that file: its values become the defaults (here 1 epoch to keep it short).
    assert single_command_main("train", "train.py", [str(data), "--defaults", str(out), "--workers", "0", "--quiet",
                                                     "--epochs", "1", "--save_dir", str(tmp_path / "ck"),
                                                     "--cache_dir", str(tmp_path / "c")]) == 0
    printed = capsys.readouterr().out
    [said] = [line for line in printed.splitlines() if line.startswith(f"Defaults from {out} (written by `search`)")]
    assert "--arch tiny" in said and f"--learning_rate {best['learning_rate']}" in said
    assert "--epochs" not in said  # given on the command line, so not from the file
    config = load_checkpoint(tmp_path / "ck" / "last.pth").config
    assert config.arch == "tiny" and config.epochs == 1
    assert (config.learning_rate, list(config.hidden_units), config.dropout, config.batch_size) == \
        (best["learning_rate"], best["hidden_units"], best["dropout"], best["batch_size"])


@pytest.mark.parametrize("args, needle", [
    (["--trials", "0"], "--trials"),
    (["--trials", "many"], "--trials"),
    (["--cache_dir", "/dev/null/cache"], "--cache_dir"),
    (["--out", "/no/such/folder/hp.json"], "--out"),
])
def test_bad_search_input_is_one_line(data, args, needle, capsys):
    try:
        status = main(["search", str(data), "--arch", "tiny", "--workers", "0", "--quiet", *args])
    except SystemExit as e:  # argparse rejects a malformed option by exiting
        status = e.code
    assert status == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0], err


def test_a_trial_scores_what_train_py_would_reach(data, tmp_path):
    """A trial trains exactly as train.py does (same order, dropout, seeds), so its score is real."""
    from flower_classifier.backbones import build_backbone
    from flower_classifier.features import load_feature_data
    from flower_classifier.search import run_trial
    from flower_classifier.training import run_training

    tiny = build_backbone("tiny")
    config = TrainConfig(arch="tiny", hidden_units=(16,), epochs=3, batch_size=4, dropout=0.3, num_workers=0)
    features = load_feature_data(data, tiny, cache_dir=tmp_path / "c", log=lambda m: None, progress=False)
    trial = run_trial(features, config)
    trained = run_training(config, data, save_dir=tmp_path / "ck", backbone=tiny, cache_dir=tmp_path / "c",
                           log=lambda m: None, progress=False)
    last = trained.state.history[-1]
    assert trial["valid_loss"] == pytest.approx(last["valid_loss"], abs=1e-6)
    assert trial["valid_accuracy"] == last["valid_accuracy"]
