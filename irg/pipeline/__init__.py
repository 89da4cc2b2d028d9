"""Inference: the IRG multi-step generator (no Ray here: notebooks, workers and replicas alike)."""

from irg.pipeline.events import PipelineEvent
from irg.pipeline.irg_pipeline import IRGOutput, IRGPipeline, resolve_device
from irg.pipeline.prompts import SYSTEM_PROMPT
from irg.pipeline.settings import RoundSettings

__all__ = ["IRGOutput", "IRGPipeline", "PipelineEvent", "RoundSettings", "SYSTEM_PROMPT", "resolve_device"]
