"""bench/bench_unknown_recipe.py on a generated folder and the tiny backbone: each species is left out
in turn, trained for real, and scored by the run's own checkpoint."""
import subprocess
import sys

from conftest import ROOT, TWELVE, make_dataset, make_image


def test_each_species_is_left_out_once_and_scored_by_its_own_run(tmp_path):
    data = make_dataset(tmp_path / "d", TWELVE[:3], per_split={"train": 6, "valid": 3, "test": 2})
    for k in range(4):  # grey photos: none of the species
        make_image(tmp_path / "neg" / f"n{k}.jpg", (128, 128, 128), seed=k)
    run = subprocess.run([sys.executable, "bench/bench_unknown_recipe.py", str(data), "--negatives", str(tmp_path / "neg"),
                          "--recipes", "plain", "--arch", "tiny", "--cache_dir", str(tmp_path / "c"),
                          "--work_dir", str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    left_out = [line for line in run.stdout.splitlines() if "left out (" in line]
    assert len(left_out) == 3 and all(f"plain, {c} left out" in run.stdout for c in TWELVE[:3])
    # The run without a species never saw it: its folder holds the other two, in every split.
    for split in ("train", "valid", "test"):
        assert sorted(p.name for p in (tmp_path / "w" / f"without-{TWELVE[0]}" / split).iterdir()) == sorted(TWELVE[1:3])
    assert (tmp_path / "w" / f"plain-without-{TWELVE[0]}" / "checkpoint.pth").is_file()
    assert "mean over the 3 species left out" in run.stdout and "AUROC other, energy" in run.stdout
    # A run found in --work_dir is reused, --species leaves out only those named, and --unknown_scores
    # measures a copy of the run's checkpoint recalibrated with each, the run's own untouched.
    again = subprocess.run([sys.executable, "bench/bench_unknown_recipe.py", str(data), "--negatives", str(tmp_path / "neg"),
                            "--recipes", "plain", "--arch", "tiny", "--species", TWELVE[1], "--unknown_scores", "mahalanobis",
                            "--work_dir", str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("left out (") == 2 and f"plain, {TWELVE[1]} left out (0 s), near_far:" in again.stdout
    assert f"plain, {TWELVE[1]} left out (0 s), mahalanobis:" in again.stdout and "(score mahalanobis), mean over the 1" in again.stdout
    run_dir = tmp_path / "w" / f"plain-without-{TWELVE[1]}"
    from flower_classifier.checkpoint import load_checkpoint
    assert load_checkpoint(run_dir / "checkpoint-mahalanobis.pth").calibration.method == "mahalanobis"
    assert load_checkpoint(run_dir / "checkpoint.pth").calibration.method == "near_far"  # the default
