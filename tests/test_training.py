"""The training loop: data order, checkpoints, exact resume after SIGKILL, two processes, export.

The end-to-end tests run ``python -m train.diffusion`` in subprocesses on a tiny UNet (16×16, 64 MNIST
digits), one thread each so that runs are bit-reproducible, and compare against one uninterrupted reference run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from pipelines import DiffusionImagePipeline
from schedulers import DDIMScheduler
from train.batch_order import GlobalBatchOrder, rank_shard
from train.checkpointing import (
    COMPLETE_MARKER,
    complete_checkpoints,
    discard_checkpoints_after,
    find_checkpoint,
    save_checkpoint,
)
from train.diffusion import build_parser, check_args

REPO = Path(__file__).resolve().parents[1]
STEPS, CHECKPOINT_EVERY = 24, 8
# per micro-batch 8 images: 1 process × batch 8, or 2 processes × batch 4; two micro-batches per step. The preview
# grids (80 images, guided) take 2 sampler steps instead of 25: nothing here looks at their pixels.
TINY_RUN = ["--model", "tiny", "--image-size", "16", "--max-train-images", "64", "--steps", str(STEPS),
            "--grad-accum", "2", "--lr", "3e-3", "--warmup", "2", "--lr-decay", "cosine",
            "--timestep-sampling", "importance", "--checkpoint-every", str(CHECKPOINT_EVERY),
            "--keep-checkpoints", "2", "--sample-every", "12", "--sample-steps", "2", "--seed", "7"]
SUBPROCESS_TIMEOUT = 300


def environment() -> dict[str, str]:
    # one thread: identical float summation order in every run, and no fight for the test machine's cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def training_command(output_dir: Path, *extra: str, batch_size: int = 8) -> list[str]:
    return [sys.executable, "-m", "train.diffusion", *TINY_RUN, "--batch-size", str(batch_size),
            "--output-dir", str(output_dir), *extra]


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-3000:]}"
    return result


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# The attention key bias gets an exactly zero gradient (softmax ignores a shift shared by all keys), so Adam
# turns whatever rounding noise is left into steps of size ~lr: summed in another order, it drifts apart.
ROUNDING_NOISE_DRIVEN = ".to_k.bias"


def assert_same_run(run_dir: Path, reference_dir: Path, rtol: float = 0.0, atol: float = 0.0,
                    noise_driven_atol: float = 0.0) -> None:
    """Same logged losses, learning rates and gradient norms; same final raw and EMA weights."""
    ours, theirs = metrics(run_dir), metrics(reference_dir)
    assert [m["step"] for m in ours] == [m["step"] for m in theirs] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm"):
        assert torch.allclose(torch.tensor([m[key] for m in ours], dtype=torch.float64),
                              torch.tensor([m[key] for m in theirs], dtype=torch.float64), rtol=rtol, atol=atol), key
    for weights in (f"checkpoint-{STEPS}/model.safetensors", "model/unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(run_dir / weights), load_file(reference_dir / weights)
        assert a.keys() == b.keys()
        for name in a:
            tolerance = noise_driven_atol if name.endswith(ROUNDING_NOISE_DRIVEN) else atol
            assert torch.allclose(a[name], b[name], rtol=rtol, atol=tolerance), f"{weights}: {name}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted single-process run."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    run(training_command(output_dir))
    return output_dir


# --------------------------------------------------------------------------------------------------
# Pure pieces: data order, shards, checkpoint bookkeeping, options
# --------------------------------------------------------------------------------------------------


def test_batch_order_depends_only_on_seed_and_position_and_covers_each_epoch():
    order = GlobalBatchOrder(dataset_size=10, global_batch_size=4, seed=5)
    stream = iter(order)
    batches = [next(stream) for _ in range(5)]  # 20 positions = two epochs
    flat = [i for batch in batches for i in batch]
    assert sorted(flat[:10]) == sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new permutation each epoch
    resumed = iter(GlobalBatchOrder(10, 4, seed=5, start_batch=3))
    assert [next(resumed), next(resumed)] == batches[3:5]
    assert next(iter(GlobalBatchOrder(10, 4, seed=6))) != batches[0]


def test_rank_shards_partition_the_global_batch():
    global_batch = list(range(12))
    shards = [global_batch[rank_shard(4, rank)] for rank in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_find_checkpoint_skips_half_written_ones(tmp_path):
    for step, complete in ((10, True), (20, True), (30, False)):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if complete:
            (path / COMPLETE_MARKER).write_text("")
    (tmp_path / "checkpoint-40.tmp").mkdir()  # killed before the rename
    (tmp_path / "checkpoint-40.tmp" / COMPLETE_MARKER).write_text("")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20"]
    assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-20"
    assert find_checkpoint(tmp_path, str(tmp_path / "checkpoint-10")) == tmp_path / "checkpoint-10"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoint-30"))
    assert find_checkpoint(tmp_path / "empty", "latest") is None


def test_resuming_an_older_checkpoint_discards_the_newer_ones(tmp_path):
    for step in (10, 20, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("")
    assert discard_checkpoints_after(tmp_path, 10) == [tmp_path / "checkpoint-20", tmp_path / "checkpoint-30"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-10"]


def test_resume_only_reads_checkpoints_of_its_own_run(tmp_path):
    foreign = tmp_path / "elsewhere" / "checkpoint-5"
    foreign.mkdir(parents=True)
    (foreign / COMPLETE_MARKER).write_text("")
    with pytest.raises(ValueError, match="only checkpoints of this run"):
        find_checkpoint(tmp_path / "run", str(foreign))


def test_save_checkpoint_is_atomic_and_keeps_the_last_k(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    (tmp_path / "checkpoint-3.tmp").mkdir()  # a leftover of a killed save
    for step in (1, 2, 3, 4):
        model.weight.data.fill_(step)
        save_checkpoint(accelerator, tmp_path, step, {"samples_seen": 8 * step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    state = json.loads((tmp_path / "checkpoint-4" / "training_state.json").read_text())
    assert state == {"step": 4, "samples_seen": 32}
    assert torch.all(load_file(tmp_path / "checkpoint-3" / "model.safetensors")["weight"] == 3)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--steps", "0", "--steps"), ("--batch-size", "0", "--batch-size"), ("--lr", "0", "--lr"),
     ("--ema-decay", "1", "--ema-decay"), ("--grad-clip", "-1", "--grad-clip"),
     ("--max-train-images", "0", "--max-train-images"), ("--sample-steps", "0", "--sample-steps")],
)
def test_out_of_range_options_raise_value_errors_naming_them(option, value, message):
    args = build_parser().parse_args(["--steps", "10", "--output-dir", "x", option, value])
    with pytest.raises(ValueError, match=message):
        check_args(args)


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


def test_a_fresh_run_refuses_a_directory_that_holds_checkpoints(reference):
    result = subprocess.run(training_command(reference), cwd=REPO, env=environment(), capture_output=True,
                            text=True, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode != 0 and "pass --resume latest" in result.stderr


def test_training_reduces_the_loss_and_writes_its_run_directory(reference):
    losses = [m["loss"] for m in metrics(reference)]
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    config = json.loads((reference / "train_config.json").read_text())
    assert config["effective_batch_size"] == 16 and config["num_processes"] == 1 and config["conditional"] is True
    # keep-checkpoints 2: the older ones are gone, and no half-written directory is left behind
    assert sorted(p.name for p in reference.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-24"]
    assert (reference / "samples" / "step-24.png").is_file()
    assert list((reference / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events"


def test_resume_after_sigkill_is_exact(reference, tmp_path):
    output_dir = tmp_path / "run"
    first_checkpoint = output_dir / f"checkpoint-{CHECKPOINT_EVERY}"
    process = subprocess.Popen(training_command(output_dir), cwd=REPO, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not (first_checkpoint / COMPLETE_MARKER).exists():
        assert process.poll() is None, "the training exited before writing its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output_dir / f"checkpoint-{STEPS}").exists()

    result = run(training_command(output_dir, "--resume", "latest"))
    assert "resumed from" in result.stdout + result.stderr
    assert_same_run(output_dir, reference)


def test_sigterm_checkpoints_the_current_step_and_resume_is_exact(reference, tmp_path):
    output_dir = tmp_path / "run"
    process = subprocess.Popen(training_command(output_dir), cwd=REPO, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not (output_dir / "metrics.jsonl").exists() or len(metrics(output_dir)) < 3:
        assert process.poll() is None, "the training exited before it was stopped"
        assert time.monotonic() < deadline, "no training steps within the time limit"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == 0, output[-2000:]
    stopped_at = metrics(output_dir)[-1]["step"]
    assert 3 <= stopped_at < STEPS and f"stopped at step {stopped_at}" in output
    assert [path.name for path in complete_checkpoints(output_dir)][-1] == f"checkpoint-{stopped_at}"
    assert not (output_dir / "model").exists()  # a stopped run is not exported as if finished

    run(training_command(output_dir, "--resume", "latest"))
    assert_same_run(output_dir, reference)


def test_resume_falls_back_past_a_checkpoint_without_its_marker(reference, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(reference, output_dir)
    # a kill during the save of step 24: its marker never written, plus a half-written later directory
    (output_dir / f"checkpoint-{STEPS}" / COMPLETE_MARKER).unlink()
    shutil.copytree(output_dir / f"checkpoint-{STEPS}", output_dir / f"checkpoint-{STEPS + 8}.tmp")
    shutil.rmtree(output_dir / "model")

    result = run(training_command(output_dir, "--resume", "latest"))
    assert f"resumed from {output_dir / 'checkpoint-16'}" in result.stdout + result.stderr
    assert json.loads((output_dir / "run_summary.json").read_text())["resumed_from_step"] == 16
    assert_same_run(output_dir, reference)


def test_a_finished_run_re_exports_half_precision_weights_that_load_as_float32(reference, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(reference, output_dir)
    run(training_command(output_dir, "--resume", "latest", "--export-dtype", "float16", "--export",
                         str(tmp_path / "half")))
    stored = load_file(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors")
    full = load_file(reference / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in stored.values()} == {torch.float16}
    assert all(torch.equal(stored[name], full[name].half()) for name in full)
    unet = DiffusionImagePipeline.from_pretrained(tmp_path / "half").unet
    assert next(unet.parameters()).dtype == torch.float32
    size = (tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size < 0.6 * (reference / "model" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size


def test_two_processes_split_each_global_batch(reference, tmp_path):
    """2 processes × batch 4 train on the two halves of the reference's global batches of 8: same run."""
    output_dir = tmp_path / "run"
    command = training_command(output_dir, batch_size=4)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run([*launcher, *command[1:]])  # torchrun … -m train.diffusion …
    config = json.loads((output_dir / "train_config.json").read_text())
    assert config["num_processes"] == 2 and config["effective_batch_size"] == 4 * 2 * 2
    digests = json.loads((output_dir / "run_summary.json").read_text())["weights_sha256_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1], "the processes ended with different weights"
    # the same sums in another order (gradients averaged across processes): equal up to float rounding
    assert_same_run(output_dir, reference, rtol=1e-5, atol=1e-6, noise_driven_atol=1e-3)


def test_exported_pipeline_loads_and_generates(reference):
    pipeline = DiffusionImagePipeline.from_pretrained(reference / "model")
    pipeline.set_progress_bar_config(disable=True)
    info = pipeline.config.model_info
    assert {k: info[k] for k in ("process", "prediction_type", "objective", "dataset", "image_size", "channels",
                                 "num_classes", "null_class_id", "model", "steps", "seed")} == {
        "process": "vp", "prediction_type": "epsilon", "objective": "vp-eps", "dataset": "mnist", "image_size": 16,
        "channels": 1, "num_classes": 10, "null_class_id": 10, "model": "tiny", "steps": STEPS, "seed": 7}
    assert info["class_names"] == [str(d) for d in range(10)]
    assert info["training_command"].startswith("OMP_NUM_THREADS=1 python -m train.diffusion --model tiny")
    assert isinstance(pipeline.scheduler, DDIMScheduler)
    assert pipeline.scheduler.config.prediction_type == "epsilon"
    output = pipeline(batch_size=4, num_inference_steps=3, class_labels=[0, 1, 2, 3], guidance_scale=2.0,
                      generator=torch.Generator().manual_seed(0), output_type="pt")
    assert output.images.shape == (4, 1, 16, 16) and output.nfe == 6
    assert torch.isfinite(output.images).all()
    assert (reference / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_init_from_copies_an_exported_unet_and_names_a_mismatch(reference):
    from models.unet import build_unet
    from train.diffusion import load_initial_weights

    model = build_unet("tiny", 16, 1, num_classes=10)
    load_initial_weights(model, reference / "model")
    exported = load_file(reference / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(value, exported[name].float()) for name, value in model.state_dict().items())
    with pytest.raises(ValueError, match=r"class_embedding.weight has shape \(11, 32\) there, \(6, 32\) here"):
        load_initial_weights(build_unet("tiny", 16, 1, num_classes=5), reference / "model")
