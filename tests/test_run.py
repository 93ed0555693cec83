"""The shared training run's pieces (``train.run``) and the preview grid (``evaluation.sampling.image_grid``).

The end-to-end behaviour of the run (exact resume, SIGTERM, two processes, export) is tested through each trainer
in tests/test_training.py, tests/test_gan.py and tests/test_vae.py.
"""

import json
import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from evaluation.sampling import image_grid
from train.run import MetricsLog, StopRequest, launch_command, run_steps, weights_digest


class FakePipeline:
    """Answers a call with raw images (in [-1, 1]) that show as the class label / 4 (0.75 without labels), values
    exact in binary so the grid's rounding is too."""

    def __init__(self, num_classes: int, size: int = 3, channels: int = 1):
        self.num_classes, self.size, self.channels = num_classes, size, channels
        self.calls = []

    def __call__(self, batch_size, generator, class_labels, output_type, **kwargs):
        self.calls.append({"batch_size": batch_size, "class_labels": class_labels, "output_type": output_type,
                           **kwargs})
        values = class_labels.float() / 4 if class_labels is not None else torch.full((batch_size,), 0.75)
        images = values[:, None, None, None].expand(batch_size, self.channels, self.size, self.size)
        return SimpleNamespace(images=images * 2 - 1)


def test_image_grid_has_a_row_per_class_with_grey_borders_and_passes_the_call_options():
    pipeline = FakePipeline(num_classes=3)
    grid = np.asarray(image_grid(pipeline, 5, seed=1, num_inference_steps=7, guidance_scale=2.0))
    assert grid.shape == (3 * 5, 5 * 5)  # rows · (H + 2), columns · (W + 2); grey-scale
    assert pipeline.calls == [{"batch_size": 15, "class_labels": pipeline.calls[0]["class_labels"],
                               "output_type": "raw", "num_inference_steps": 7, "guidance_scale": 2.0}]
    assert pipeline.calls[0]["class_labels"].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    for row in range(3):
        cell = grid[row * 5:(row + 1) * 5, 5:10]
        assert (cell[0] == 128).all() and (cell[:, -1] == 128).all()  # 1-pixel borders, grey 0.5
        assert (cell[1:-1, 1:-1] == round(row / 4 * 255)).all()


def test_image_grid_of_an_unconditional_colour_pipeline_has_four_rows():
    pipeline = FakePipeline(num_classes=0, size=2, channels=3)
    grid = np.asarray(image_grid(pipeline, 2))
    assert grid.shape == (4 * 4, 2 * 4, 3)
    assert pipeline.calls[0]["class_labels"] is None and (grid[1:3, 1:3] == round(0.75 * 255)).all()


def test_run_steps_starts_where_told_and_stops_when_after_step_says_so():
    seen = []

    def after_step(done, values):
        seen.append((done, values["loss"]))
        return done == 5

    assert run_steps(lambda step: {"loss": float(step)}, 2, 10, "test", show=False, after_step=after_step) == 5
    assert seen == [(3, 2.0), (4, 3.0), (5, 4.0)]
    assert run_steps(lambda step: {"loss": 0.0}, 0, 4, "test", show=False) == 4


def test_metrics_log_drops_the_lines_past_the_resumed_step(tmp_path):
    accelerator = Accelerator(cpu=True)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2, 3)))
    log = MetricsLog(accelerator, tmp_path, resumed_step=2)
    log.log(3, {"loss": 0.5})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 1}, {"step": 2, "loss": 2}, {"step": 3, "loss": 0.5}]


def test_stop_request_turns_sigterm_into_a_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest(Accelerator(cpu=True))
    assert not stop.requested()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested()
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_launch_command_reproduces_the_run(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launch_command(["--steps", "3", "--output-dir", "a b"], 1, "train.vae") == \
        "OMP_NUM_THREADS=1 python -m train.vae --steps 3 --output-dir 'a b'"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert launch_command([], 2, "train.gan") == "torchrun --nproc_per_node=2 -m train.gan"


@pytest.mark.parametrize("change", [False, True])
def test_weights_digest_tells_bit_identical_weights_apart(change):
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    if change:
        with torch.no_grad():
            b.bias[0] = torch.nextafter(b.bias[0], torch.tensor(1.0))
    assert (weights_digest(a) == weights_digest(b)) is not change
