"""Component registration (pipelines/loading.py): ``from_pretrained`` imports the modules ``model_index.json``
names, from the allowed libraries only, so no pipeline module imports the packages of its components."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import schedulers
from evaluation.exact import ExactScoreModel
from models.classifier import NoisyClassifier
from pipelines import DiffusionImagePipeline
from pipelines.loading import COMPONENT_LIBRARIES, component_modules

ROOT = Path(__file__).resolve().parents[1]

# Loads a pipeline in a fresh interpreter and reports which component modules were imported before and after.
LOAD_IN_FRESH_PROCESS = """
import json, sys
from pipelines import DiffusionImagePipeline
watched = ("evaluation.exact", "models.classifier")
before = [name for name in watched if name in sys.modules]
pipe = DiffusionImagePipeline.from_pretrained(sys.argv[1])
components = {name: type(getattr(pipe, name)).__module__ + "." + type(getattr(pipe, name)).__name__
              for name in ("unet", "scheduler", "classifier") if getattr(pipe, name, None) is not None}
print(json.dumps({"before": before, "components": components}))
"""


def load_in_fresh_process(path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_shipped_exact_model_loads_without_pipelines_importing_evaluation():
    loaded = load_in_fresh_process(ROOT / "checkpoints" / "mnist-exact")
    assert loaded["before"] == []
    assert loaded["components"] == {"unet": "evaluation.exact.ExactScoreModel",
                                    "scheduler": "schedulers.ddim.DDIMScheduler"}


def test_a_classifier_component_loads_without_pipelines_importing_models_classifier(tmp_path, class_mixture):
    classifier = NoisyClassifier(num_classes=3, widths=(8, 8, 8), feature_dim=8, time_dim=8)
    pipe = DiffusionImagePipeline(ExactScoreModel.from_mixture(class_mixture), schedulers.DDIMScheduler(),
                                  classifier=classifier)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "model_index.json").read_text())["classifier"] == ["models.classifier",
                                                                                     "NoisyClassifier"]
    loaded = load_in_fresh_process(tmp_path)
    assert loaded["before"] == []
    assert loaded["components"]["classifier"] == "models.classifier.NoisyClassifier"


def test_from_pretrained_refuses_a_component_library_outside_the_allowed_ones(tmp_path, mixture):
    DiffusionImagePipeline(ExactScoreModel.from_mixture(mixture), schedulers.DDIMScheduler()).save_pretrained(
        tmp_path, safe_serialization=True)
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "unet": ["os", "system"]}))
    with pytest.raises(ValueError, match="component 'unet' comes from 'os'"):
        DiffusionImagePipeline.from_pretrained(tmp_path)


def test_component_modules_lists_set_components_only():
    index = {"_class_name": "DiffusionImagePipeline", "model_info": {"process": "vp"},
             "unet": ["evaluation.exact", "ExactScoreModel"], "scheduler": ["schedulers.ddim", "DDIMScheduler"],
             "classifier": [None, None]}
    assert component_modules(index) == ["evaluation.exact", "schedulers.ddim"]
    assert {"diffusers", "evaluation", "models", "schedulers"} <= set(COMPONENT_LIBRARIES)
