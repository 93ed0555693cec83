"""Train tab: start a training run as a background process, watch its loss and samples, stop and resume it.

The trainers are discovered: ``train.diffusion`` with one entry per objective in ``train.objectives.OBJECTIVES``,
and ``train.gan`` / ``train.vae`` when those modules exist. A run's command line is built from the form, kept to
the options the trainer's own parser (``build_parser()``) knows, and checked by that parser before anything
starts; the page shows it, so the same run is reproducible from a shell.

A run is a child process in its own session (``start_new_session``): a crash of the app does not kill it, and
its death does not touch the app. It writes ``runs/NAME`` (``metrics.jsonl``, ``samples/``, checkpoints, and
``ui_run.json``/``ui.log`` from here) and exports its model to ``runs/models/NAME``, a folder the model list
scans, so the finished model appears in Generate without a restart. Stop sends SIGTERM to the run's process
group: the trainer finishes its step, checkpoints and exits (SIGKILL 60 s later if it has not); Resume starts
the same command with ``--resume latest``.
"""

import argparse
import importlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import gradio as gr
import pandas

from webui import models
from webui.validation import inside, number, run_name

KILL_AFTER = 60.0  # seconds between SIGTERM (the trainer finishes its step and checkpoints) and SIGKILL
POLL_SECONDS = 2.0
RUN_FILE = "ui_run.json"
LOG_FILE = "ui.log"
HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.-]+)?$")
DATASETS = ("mnist (shipped split)", "image folder", "datasets (hub name or save_to_disk folder)")


def trainers() -> dict[str, tuple[str, str | None]]:
    """Label → (module, objective) for every trainer this checkout has."""
    from train.objectives import OBJECTIVES, objective_label

    found = {f"{objective_label(name)} ({name})": ("train.diffusion", name) for name in OBJECTIVES}
    for module, label in (("train.gan", "GAN"), ("train.vae", "VAE")):
        if importlib.util.find_spec(module) is not None:
            found[label] = (module, None)
    return found


def trainer_parser(module: str) -> argparse.ArgumentParser | None:
    build = getattr(importlib.import_module(module), "build_parser", None)
    return build() if build else None


FORM_OPTIONS = ("--dataset", "--objective", "--model", "--steps", "--batch-size", "--lr", "--checkpoint-every",
                "--sample-every", "--max-train-images", "--output-dir", "--export", "-h", "--help", "--resume")


def trainer_form(label):
    """Widget updates for a trainer: its ``--model`` choices as size presets, and its other options as a hint for
    the extra-options box (e.g. ``--pfgm-D`` for PFGM++, ``--udm-loss`` for UDM, ``--ogan`` for the GAN)."""
    found = trainers()
    if label not in found:
        return gr.update(), gr.update()
    parser = trainer_parser(found[label][0])
    if parser is None:
        return gr.update(visible=False), gr.update(info="passed to the trainer as typed")
    model = parser._option_string_actions.get("--model")
    presets = list(model.choices or []) if model is not None else []
    extra = sorted({action.option_strings[0] for action in parser._actions if action.option_strings
                    and not set(action.option_strings) & set(FORM_OPTIONS)})
    return (gr.update(choices=presets, value=presets[0] if presets else None, visible=bool(presets)),
            gr.update(info="its other options: " + " ".join(extra)))


class Runs:
    """The runs directory and the processes this app started."""

    def __init__(self, root: Path, runs_dir: Path, data_roots: list[Path]):
        self.root = root  # the repository: runs start here, so ``-m train.diffusion`` imports
        self.dir = runs_dir
        self.models_dir = runs_dir / "models"
        self.data_roots = data_roots
        self.processes: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def listed(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir()
                      if p.is_dir() and ((p / RUN_FILE).exists() or (p / "metrics.jsonl").exists()))

    # ---------------------------------------------------------------------------------------- commands

    def dataset(self, kind, text) -> str:
        kind = kind if kind in DATASETS else None
        if kind is None:
            raise gr.Error(f"dataset must be one of: {', '.join(DATASETS)}")
        if kind == DATASETS[0]:
            return "mnist"
        if kind == DATASETS[1]:
            path = inside("image folder", text, self.data_roots)
            if not path.is_dir():
                raise gr.Error(f"image folder {text!r} is not a directory")
            return f"folder:{path}"
        if isinstance(text, str) and (Path(text).expanduser().exists() or text.startswith(("/", ".", "~"))):
            return f"hf:{inside('datasets folder', text, self.data_roots)}"
        if not isinstance(text, str) or not HUB_NAME.match(text.strip()):
            raise gr.Error(f"datasets name {text!r} must look like NAME, OWNER/NAME or OWNER/NAME:SPLIT")
        return f"hf:{text.strip()}"

    def command(self, name, trainer, dataset_kind, dataset_text, preset, steps, batch, lr, checkpoint_every,
                sample_every, max_images, extra) -> tuple[str, list[str]]:
        """The trainer module and its arguments; ``gr.Error`` names the first bad setting."""
        name = run_name(name)
        found = trainers()
        if trainer not in found:
            raise gr.Error(f"trainer {trainer!r} is not one of: {', '.join(found)}")
        module, objective = found[trainer]
        options = {
            "--dataset": self.dataset(dataset_kind, dataset_text),
            "--objective": objective,
            "--model": preset,
            "--steps": number("steps", steps, 1, 1_000_000, integer=True),
            "--batch-size": number("batch size", batch, 1, 4096, integer=True),
            "--lr": number("learning rate", lr, 1e-8, 1.0),
            "--checkpoint-every": number("checkpoint every", checkpoint_every, 1, 1_000_000, integer=True),
            "--sample-every": number("sample every", sample_every, 0, 1_000_000, integer=True),
            "--max-train-images": number("max train images", max_images, 0, 10**9, integer=True) or None,
            "--output-dir": self.shown(self.dir / name),
            "--export": self.shown(self.models_dir / name),
        }
        try:
            extra_args = shlex.split(extra or "")
        except ValueError as error:
            raise gr.Error(f"extra options: {error}") from None
        parser = trainer_parser(module)
        known = None if parser is None else parser._option_string_actions
        argv = []
        for flag, value in options.items():
            if value is not None and (known is None or flag in known) and flag not in extra_args:
                argv += [flag, str(value)]
        argv += extra_args
        if parser is not None:
            check(parser, module, argv)
        return module, argv

    def shown(self, path: Path) -> str:
        """``path`` relative to the repository when inside it (a short, copyable command)."""
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    # ---------------------------------------------------------------------------------------- processes

    def running(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def start(self, name: str, module: str, argv: list[str], resume: bool = False) -> str:
        with self._lock:
            if self.running(name):
                raise gr.Error(f"run {name} is already running")
            run_dir = self.dir / name
            if not resume and run_dir.exists():
                raise gr.Error(f"run {name} exists: Resume it, or choose another run name")
            run_dir.mkdir(parents=True, exist_ok=True)
            if resume and "--resume" not in argv:
                argv = [*argv, "--resume", "latest"]
            command = [sys.executable, "-m", module, *argv]
            with open(run_dir / LOG_FILE, "ab") as log:
                process = subprocess.Popen(command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self.processes[name] = process
            record = {"module": module, "argv": [a for a in argv if a not in ("--resume", "latest")],
                      "pid": process.pid, "command": shell_command(module, argv)}
            (run_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
            return record["command"]

    def resume(self, name) -> str:
        record_file = self.dir / run_name(name) / RUN_FILE
        if not record_file.exists():
            raise gr.Error(f"run {name} was not started from this app: resume it from the command line")
        record = json.loads(record_file.read_text())
        return self.start(name, record["module"], record["argv"], resume=True)

    def stop(self, name) -> str:
        process = self.processes.get(run_name(name))
        if process is None or process.poll() is not None:
            raise gr.Error(f"run {name} is not running")
        os.killpg(process.pid, signal.SIGTERM)

        def kill_if_alive():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)

        timer = threading.Timer(KILL_AFTER, kill_if_alive)
        timer.daemon = True
        timer.start()
        return f"stopping {name} (SIGTERM)"

    def status(self, name) -> str:
        process = self.processes.get(name)
        exported = (self.models_dir / name / "model_index.json").exists()
        if process is not None and process.poll() is None:
            return f"**{name}**: running (pid {process.pid})"
        if process is not None and process.returncode not in (0, None):
            how = f"signal {-process.returncode}" if process.returncode < 0 else f"exit code {process.returncode}"
            return f"**{name}**: stopped ({how}); Resume continues from its last checkpoint"
        if exported:
            return f"**{name}**: finished; model exported to `runs/models/{name}`, listed in Generate (press ↻)"
        if process is not None:  # exit code 0 without an export: stopped by SIGTERM after checkpointing its step
            return f"**{name}**: stopped (checkpoint saved at the current step); Resume continues from it"
        return f"**{name}**: not running"


def check(parser: argparse.ArgumentParser, module: str, argv: list[str]) -> None:
    """Parse ``argv`` with the trainer's parser (and its ``check_args``), turning its exits into ``gr.Error``."""

    def error(message):
        raise gr.Error(f"{module}: {message}")

    parser.error = error
    parser.exit = lambda status=0, message=None: error(message or "asked to exit (--help?)")
    args = parser.parse_args(argv)
    check_args = getattr(importlib.import_module(module), "check_args", None)
    if check_args is not None:
        try:
            check_args(args)
        except ValueError as problem:
            error(str(problem))


def shell_command(module: str, argv: list[str]) -> str:
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return threads + shlex.join(["python", "-m", module, *argv])


def read_progress(run_dir: Path):
    """(loss curve, newest sample grid path, log tail) of a run, from its files."""
    metrics = run_dir / "metrics.jsonl"
    rows = []
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                continue
            if "loss" in row:
                rows.append({"step": row["step"], "loss": row["loss"]})
    curve = pandas.DataFrame(rows[:: max(1, len(rows) // 1000)], columns=["step", "loss"]).astype(
        {"step": int, "loss": float})  # numbers, also when empty: the plot's axes are then quantitative
    samples = sorted((run_dir / "samples").glob("step-*.png"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    log = run_dir / LOG_FILE
    tail = ""
    if log.exists():
        text = log.read_bytes()[-20000:].decode(errors="replace")
        tail = "\n".join(re.split(r"[\r\n]+", text)[-15:])
    return curve, str(samples[-1]) if samples else None, tail


def build(catalog: models.ModelCatalog, runs: Runs, model_dropdown) -> None:
    found = trainers()
    gr.Markdown("Trains in a background process; the page follows its logs. The command below runs the same "
                "training from a shell.")
    with gr.Row():
        with gr.Column():
            name = gr.Textbox(f"run-{len(runs.listed()) + 1}", label="run name (runs/NAME)", elem_id="train-name")
            trainer = gr.Dropdown(list(found), value=next(iter(found)), label="forward process / trainer")
            with gr.Row():
                dataset_kind = gr.Dropdown(list(DATASETS), value=DATASETS[0], label="dataset")
                dataset_text = gr.Textbox("", label="folder path or datasets name")
            preset_update, extra_update = trainer_form(next(iter(found)))
            preset = gr.Dropdown(preset_update["choices"], value="tiny" if "tiny" in preset_update["choices"] else
                                 preset_update["value"], label="model size")
            with gr.Row():
                steps = gr.Number(200, precision=0, label="steps", minimum=1, elem_id="train-steps")
                batch = gr.Number(32, precision=0, label="batch size", minimum=1, elem_id="train-batch")
                lr = gr.Number(5e-4, label="learning rate")
            with gr.Row():
                checkpoint_every = gr.Number(50, precision=0, label="checkpoint every", minimum=1)
                sample_every = gr.Number(100, precision=0, label="sample every (0: never)", minimum=0)
                max_images = gr.Number(0, precision=0, label="max train images (0: all)", minimum=0,
                                       elem_id="train-max-images")
            extra = gr.Textbox("", label="extra options (e.g. PFGM++ D or a UDM operator)",
                               info=extra_update["info"])
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                resume = gr.Button("Resume")
            command = gr.Code(label="command line", language="shell", interactive=False, wrap_lines=True,
                              elem_id="train-command")
        with gr.Column():
            run = gr.Dropdown(runs.listed(), value=None, label="run to watch", allow_custom_value=True)
            status = gr.Markdown(elem_id="train-status")
            curve = gr.LinePlot(x="step", y="loss", label="loss", height=250)
            samples = gr.Image(label="latest EMA samples", type="filepath")
            log = gr.Textbox(label="log", lines=8, max_lines=8, autoscroll=True)

    form = [name, trainer, dataset_kind, dataset_text, preset, steps, batch, lr, checkpoint_every, sample_every,
            max_images, extra]

    def on_start(*values):
        module, argv = runs.command(*values)
        shown = runs.start(values[0], module, argv)
        return shown, gr.update(choices=runs.listed(), value=values[0]), f"**{values[0]}**: starting"

    def on_resume(name):
        shown = runs.resume(name)
        return shown, gr.update(choices=runs.listed(), value=name), f"**{name}**: resuming"

    def on_stop(name):
        return runs.stop(name)

    seen = {"models": tuple(catalog.listed())}

    def poll(name):
        listed = tuple(catalog.listed())
        models_update = gr.update(choices=list(listed)) if listed != seen["models"] else gr.update()
        seen["models"] = listed
        if not name or not isinstance(name, str) or name not in runs.listed():
            return gr.update(), None, None, "", models_update
        curve_rows, sample, tail = read_progress(runs.dir / name)
        return runs.status(name), curve_rows, sample, tail, models_update

    trainer.change(trainer_form, trainer, [preset, extra], api_name=False)
    start.click(on_start, form, [command, run, status], api_name="train_start")
    resume.click(on_resume, name, [command, run, status], api_name="train_resume")
    stop.click(on_stop, name, status, api_name="train_stop")
    name.change(lambda n: gr.update(value=n) if n in runs.listed() else gr.update(), name, run, api_name=False)
    timer = gr.Timer(POLL_SECONDS)
    timer.tick(poll, run, [status, curve, samples, log, model_dropdown], api_name=False, show_progress="hidden",
               queue=False)
    run.change(poll, run, [status, curve, samples, log, model_dropdown], api_name=False, queue=False)
