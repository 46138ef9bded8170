"""Memory accounting on the meta device for the full-size Pixtral-12B (tests/data/params.json):
W4A16 group 128 holds at most 9.5 GB of weights with embeddings, lm_head and the ViT in bf16, FP8
at most 14.6 GB; one decode step reads about 7.0 GB and 12.3 GB."""
import pytest
import torch

from pixtral_fast.config import ModelArgs
from pixtral_fast.model.pixtral import build_model
from pixtral_fast.quant.linear import QuantFeedForward, QuantLinear
from pixtral_fast.quant.memory import decode_step_bytes, held_bytes
from pixtral_fast.model.quantized import build_quantized_meta_model

GB = 1e9


@pytest.fixture(scope="module")
def args():
    return ModelArgs.from_params_json("tests/data/params.json")


@pytest.mark.parametrize("scheme,held_max,decode_expected", [("w4a16", 9.5, 7.0), ("fp8", 14.6, 12.3)])
def test_full_size_budget(args, scheme, held_max, decode_expected):
    model = build_quantized_meta_model(args, scheme, group_size=128)
    layer = model.layers[0]
    assert isinstance(layer.attention.wq, QuantLinear) and isinstance(layer.feed_forward, QuantFeedForward)
    assert not any(isinstance(m, QuantLinear) for m in model.vision_encoder.modules())
    held, decode = held_bytes(model) / GB, decode_step_bytes(model) / GB
    dense = build_model(args, device="meta", dtype=torch.bfloat16)
    print(f"\n{scheme}: holds {held:.2f} GB (bf16: {held_bytes(dense) / GB:.2f} GB), "
          f"one decode step reads {decode:.2f} GB (bf16: {decode_step_bytes(dense) / GB:.2f} GB)")
    assert held <= held_max
    assert abs(decode - decode_expected) <= 0.1
