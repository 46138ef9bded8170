"""The engine on a quantized tiny model (the real tokenizer, images) generates greedily exactly what
full recomputation with the same quantized model does: paged cache, batching and the decode runner
change nothing for QuantLinear layers either."""
import numpy as np
import pytest
import torch
from PIL import Image

import pixtral_fast as pf
from pixtral_fast.quant.linear import QuantLinear
from pixtral_fast.model.quantized import quantize_model
from pixtral_fast.tiny import make_tiny
from tests.support.recompute import greedy_by_recompute


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def chat(text, *images):
    return [{"role": "user", "content": [{"type": "image", "image": im} for im in images]
             + [{"type": "text", "text": text}]}]


def picture(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("scheme", ["w4a16", "fp8"])
def test_greedy_equals_full_recompute(tiny_dir, scheme):
    model = pf.load_model(tiny_dir, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    dense_logits = model(torch.tensor([1, 3, 1000, 1001, 4]))
    quantize_model(model, scheme, group_size=32)
    assert isinstance(model.layers[0].feed_forward.w1, QuantLinear)
    assert (model(torch.tensor([1, 3, 1000, 1001, 4])) - dense_logits).abs().max() > 1e-3  # really quantized
    eng = pf.Engine.from_model(model, num_blocks=128, block_size=16, progress=False)
    assert f"weights={scheme}" in eng.describe()  # the engine says which scheme runs
    messages = chat("Describe what you see, please.", picture(70, 40, 0))
    enc = eng.tokenizer.encode(messages)
    got = eng.generate(messages, max_new_tokens=30)
    expected = greedy_by_recompute(model, enc.tokens, enc.images, 30, stop_ids=(eng.tokenizer.eos_id,))
    assert got.tokens == expected and len(got.tokens) == 30
    assert eng.blocks.usage()["used_blocks"] == 0
