"""The workbench's web UI: generate, compare samplers side by side, train, evaluate.

``python app.py`` serves http://127.0.0.1:7860 (never a share link) with every pipeline directory under
``checkpoints/``, ``runs/models/`` (where the Train tab exports) and each ``--models DIR``. The tabs live in
``webui/``; this file only reads the command line and starts the server.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gradio as gr

from webui import build_ui
from webui.models import ModelCatalog
from webui.training import Runs

ROOT = Path(__file__).resolve().parent
DEFAULT_MODELS = ROOT / "checkpoints"
RUNS = ROOT / "runs"
QUEUE_SIZE = 64  # requests waiting at once; more are refused with "queue full" rather than piling up


def make_app(model_dirs: list[Path] = (), runs_dir: Path = RUNS) -> gr.Blocks:
    """The UI over the shipped models, the Train tab's exports (``runs_dir/models``) and ``model_dirs``."""
    catalog = ModelCatalog([DEFAULT_MODELS, runs_dir / "models", *model_dirs], base=ROOT)
    runs = Runs(ROOT, runs_dir, data_roots=[ROOT, *model_dirs])
    return build_ui(catalog, runs)


def launch(ui: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **options):
    """Serve ``ui`` with the compute lane (generate, compare, benchmarks) one request at a time."""
    return ui.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE).launch(
        server_name=host, server_port=port, share=False, allowed_paths=[str(RUNS), str(ROOT / "bench" / "results")],
        **options)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serve the diffusion workbench UI.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--models", type=Path, action="append", default=[], metavar="DIR",
                        help="another folder of pipeline directories (repeatable)")
    args = parser.parse_args(argv)
    for folder in args.models:
        if not folder.is_dir():
            parser.error(f"--models {folder}: not a directory")
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    launch(make_app(args.models), args.host, args.port)


if __name__ == "__main__":
    main()
