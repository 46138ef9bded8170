"""pixtral_fast: a custom-kernel inference engine for Pixtral-12B."""
from pixtral_fast import ops, reference
from pixtral_fast.config import ModelArgs, TextArgs, VisionArgs
from pixtral_fast.model.load import load_model
from pixtral_fast.model.pixtral import Pixtral, build_model
from pixtral_fast.runtime.engine import Completion, Engine, RequestError
from pixtral_fast.runtime.sampling import SamplingParams

__all__ = ["ops", "reference", "ModelArgs", "TextArgs", "VisionArgs", "Pixtral", "build_model", "load_model",
           "Engine", "Completion", "RequestError", "SamplingParams"]
