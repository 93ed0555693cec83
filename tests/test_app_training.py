"""The Train tab: command lines built from the form and checked by the trainer's own parser; runs as detached
processes that the page follows, stops and resumes; a finished run's model joins the model list."""

import os
import time

import pytest

from tests.app_helpers import CHECKPOINTS, ROOT
from webui.models import ModelCatalog
from webui.training import DATASETS, Runs, read_progress, shell_command, trainer_form, trainers

FAKE = "tests.app_fake_trainer"


@pytest.fixture
def runs(tmp_path):
    return Runs(ROOT, tmp_path / "runs", data_roots=[ROOT, tmp_path])


def form(**changes):
    vp = next(label for label in trainers() if "(vp-eps)" in label)
    values = {"name": "r1", "trainer": vp, "dataset_kind": DATASETS[0], "dataset_text": "", "preset": "tiny",
              "steps": 10, "batch": 8, "lr": 1e-3, "checkpoint_every": 5, "sample_every": 0, "max_images": 16,
              "extra": "--seed 3"}
    return {**values, **changes}


def wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_the_form_becomes_the_trainers_command_line(runs, tmp_path):
    module, argv = runs.command(*form().values())
    assert module == "train.diffusion"
    pairs = dict(zip(argv[::2], argv[1::2]))
    assert pairs["--objective"] == "vp-eps" and pairs["--model"] == "tiny" and pairs["--steps"] == "10"
    assert pairs["--max-train-images"] == "16" and pairs["--seed"] == "3"
    assert pairs["--output-dir"] == str(runs.dir / "r1") and pairs["--export"] == str(runs.dir / "models" / "r1")
    assert shell_command(module, argv).endswith("python -m train.diffusion " + " ".join(argv))
    (tmp_path / "digits").mkdir()
    _, argv = runs.command(*form(dataset_kind=DATASETS[1], dataset_text=str(tmp_path / "digits")).values())
    assert f"folder:{tmp_path / 'digits'}" in argv
    _, argv = runs.command(*form(dataset_kind=DATASETS[2], dataset_text="owner/digits:train").values())
    assert "hf:owner/digits:train" in argv


def test_each_trainer_gets_only_the_options_its_parser_knows(runs):
    found = trainers()
    assert len(found) >= 3  # at least the three VP parameterizations
    if "GAN" in found:
        module, argv = runs.command(*form(trainer="GAN", preset=None).values())
        assert module == "train.gan" and "--objective" not in argv and "--model" not in argv
        presets, _ = trainer_form("GAN")
        assert presets["visible"] is False
    pfgm = next((label for label in found if "(pfgmpp)" in label), None)
    if pfgm:
        _, argv = runs.command(*form(trainer=pfgm, extra="--pfgm-D 64").values())
        assert argv[-2:] == ["--pfgm-D", "64"] and "--objective" in argv


def test_a_run_is_followed_stopped_resumed_and_exported(runs):
    catalog = ModelCatalog([CHECKPOINTS, runs.models_dir], base=ROOT)
    argv = ["--steps", "120", "--output-dir", str(runs.dir / "r1"), "--export", str(runs.models_dir / "r1")]
    shown = runs.start("r1", FAKE, argv)
    assert shown.endswith(f"-m {FAKE} " + " ".join(argv))
    process = runs.processes["r1"]
    assert os.getpgid(process.pid) == process.pid != os.getpgid(0)  # its own session: survives the app
    wait_for(lambda: len(read_progress(runs.dir / "r1")[0]) >= 3)
    assert "running" in runs.status("r1")
    curve, sample, log = read_progress(runs.dir / "r1")
    assert list(curve.columns) == ["step", "loss"] and curve["loss"].iloc[0] == 1.0
    assert sample.endswith("step-1.png") and "step" in log

    runs.stop("r1")
    wait_for(lambda: process.poll() is not None)
    assert process.returncode == -15 and "stopped (signal 15)" in runs.status("r1")
    steps_done = len(read_progress(runs.dir / "r1")[0])
    assert steps_done < 120

    runs.resume("r1")
    wait_for(lambda: runs.processes["r1"].poll() is not None, seconds=60)
    assert runs.processes["r1"].returncode == 0
    assert (runs.dir / "r1" / "argv.jsonl").read_text().splitlines()[-1].endswith('"--resume", "latest"]')
    curve, _, _ = read_progress(runs.dir / "r1")
    assert curve["step"].tolist() == list(range(1, 121))  # resumed where it stopped, nothing twice
    assert "finished" in runs.status("r1") and "r1" in catalog.listed()


def test_a_run_that_dies_leaves_a_clear_status(runs):
    runs.start("bad", FAKE, ["--steps", "x", "--output-dir", str(runs.dir / "bad"), "--export", "y"])
    wait_for(lambda: runs.processes["bad"].poll() is not None)
    assert "stopped (exit code 2)" in runs.status("bad")
    assert "invalid int value" in read_progress(runs.dir / "bad")[2]
