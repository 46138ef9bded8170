"""pixtral_fast: a custom-kernel inference engine for Pixtral-12B."""
from pixtral_fast import ops, reference
from pixtral_fast.config import ConfigError, ModelArgs, TextArgs, VisionArgs
from pixtral_fast.model.load import CheckpointNotFound, load_model
from pixtral_fast.model.pixtral import Pixtral, build_model
from pixtral_fast.runtime.engine import Completion, Engine, RequestError
from pixtral_fast.runtime.sampling import SamplingParams
from pixtral_fast.weights import CheckpointError

__all__ = ["ops", "reference", "ModelArgs", "TextArgs", "VisionArgs", "Pixtral", "build_model", "load_model",
           "Engine", "Completion", "RequestError", "SamplingParams", "ConfigError", "CheckpointError",
           "CheckpointNotFound"]
