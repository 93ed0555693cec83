"""The forward processes, one module each: ``PROCESSES`` maps a model's recorded ``process`` to its class.

Adding a forward process is one module here plus its tests: its class says how to noise data for training,
how its networks see σ-space (if it has a σ-space image), and which scheduler config keys describe it; the
objectives, the samplers' constructors, the registry and the app read everything else from it.
"""

from .base import SCHEDULE_DEFAULTS, Process, SigmaProcess, TrainingExample, takes_process_config
from .edm import EDMProcess, PFGMppProcess
from .flow import FlowProcess
from .udm import UDMBlurProcess, UDMMaskProcess, UDMNoiseProcess, UDMProcess
from .vp import VPProcess

PROCESSES: dict[str, type[Process]] = {cls.name: cls for cls in (
    VPProcess, FlowProcess, EDMProcess, PFGMppProcess, UDMBlurProcess, UDMMaskProcess, UDMNoiseProcess)}

# The scheduler config's ``model_process`` → the σ-space map of its models (PFGM++ models are EDM networks).
MODEL_PROCESSES: dict[str, type[SigmaProcess]] = {cls.model_process: cls
                                                   for cls in (VPProcess, FlowProcess, EDMProcess)}

# Processes whose models every Gaussian σ-space sampler drives: the registry's default ``processes`` for them.
GAUSSIAN_SIGMA_PROCESSES = tuple(name for name, cls in PROCESSES.items()
                                 if issubclass(cls, SigmaProcess) and cls.gaussian)

# Every config key that describes a trained model's process; a sampler built for a model inherits them.
CONFIG_KEYS = tuple(dict.fromkeys(key for cls in PROCESSES.values() for key in cls.config_keys()))


def sigma_process(config) -> SigmaProcess:
    """The σ-space map of a scheduler config's model (its ``model_process``, default ``vp``)."""
    name = config.get("model_process", "vp")
    if name not in MODEL_PROCESSES:
        raise ValueError(f"unknown model_process {name!r}; choose one of {tuple(MODEL_PROCESSES)}")
    return MODEL_PROCESSES[name].from_config(config)


__all__ = ["CONFIG_KEYS", "EDMProcess", "FlowProcess", "GAUSSIAN_SIGMA_PROCESSES", "MODEL_PROCESSES", "PFGMppProcess",
           "PROCESSES", "Process", "SCHEDULE_DEFAULTS", "SigmaProcess", "TrainingExample", "UDMBlurProcess",
           "UDMMaskProcess", "UDMNoiseProcess", "UDMProcess", "VPProcess", "sigma_process", "takes_process_config"]
