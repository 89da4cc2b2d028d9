"""Inference: the IRG multi-step generator (no Ray here: notebooks, workers and replicas alike)."""

from irg.pipeline.events import PipelineEvent
from irg.pipeline.irg_pipeline import IRGOutput, IRGPipeline
from irg.pipeline.prompts import SYSTEM_PROMPT
from irg.pipeline.request import (
    DEFAULTS,
    LIMITS,
    GenerationDefaults,
    GenerationLimits,
    GenerationRequest,
    InvalidRequestError,
    model_defaults,
    validate_request,
)
from irg.pipeline.settings import RoundSettings

__all__ = ["DEFAULTS", "LIMITS", "SYSTEM_PROMPT", "GenerationDefaults", "GenerationLimits", "GenerationRequest",
           "IRGOutput", "IRGPipeline", "InvalidRequestError", "PipelineEvent", "RoundSettings", "model_defaults",
           "validate_request"]
