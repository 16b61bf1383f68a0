"""attendo: a transformer language-model engine you can read in an afternoon."""

from attendo.config import ModelConfig
from attendo.errors import (
    AttendoError,
    CheckpointError,
    ContextLengthError,
    InvalidSettingError,
    ModelNotFoundError,
    UnsafeCheckpointError,
    UnsupportedModelError,
)
from attendo.generation.loop import GenerationResult
from attendo.generation.sampler import SamplingSettings
from attendo.loader import load
from attendo.model import Model
from attendo.presets import PRESETS, build

__all__ = [
    "AttendoError",
    "CheckpointError",
    "ContextLengthError",
    "GenerationResult",
    "InvalidSettingError",
    "Model",
    "ModelConfig",
    "ModelNotFoundError",
    "PRESETS",
    "SamplingSettings",
    "UnsafeCheckpointError",
    "UnsupportedModelError",
    "build",
    "load",
]
