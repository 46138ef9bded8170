"""Quantized decode under CUDA graphs (GPU only): a W4A16 or FP8 engine replaying its captured
decode graphs generates exactly what the same engine does eagerly, batch 1 and a mixed batch with
images, and what full recomputation gives; nothing is left held."""
import numpy as np
import pytest
import torch
from PIL import Image

import pixtral_fast as pf
from pixtral_fast.model.quantized import quantize_model
from pixtral_fast.tiny import make_tiny
from tests.support.recompute import greedy_by_recompute

pytestmark = pytest.mark.gpu


def chat(text, *images):
    return [{"role": "user", "content": [{"type": "image", "image": im} for im in images]
             + [{"type": "text", "text": text}]}]


def picture(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def engine(tiny_dir, scheme, graphs):
    model = pf.load_model(tiny_dir, device="cuda", dtype=torch.bfloat16, backend="fast", progress=False)
    quantize_model(model, scheme, group_size=32)
    return pf.Engine.from_model(model, num_blocks=128, block_size=16, max_batch_size=8,
                                use_cuda_graphs=graphs, progress=False)


@pytest.mark.parametrize("scheme", ["w4a16", "fp8"])
def test_graph_replay_equals_eager_and_recompute(tiny_dir, scheme):
    graphed, eager = engine(tiny_dir, scheme, True), engine(tiny_dir, scheme, False)
    assert graphed.decode_runner.use_cuda_graphs and not eager.decode_runner.use_cuda_graphs
    batch = [chat("Describe the picture.", picture(70, 40, 0)), chat("Hello!"),
             chat("Two pictures:", picture(32, 48, 1), picture(64, 64, 2))]
    for requests in ([batch[0]], batch):
        got = graphed.generate(requests, max_new_tokens=12)
        assert [c.tokens for c in got] == [c.tokens for c in eager.generate(requests, max_new_tokens=12)]
    assert graphed.decode_runner.graphs, "no decode graph was replayed"
    enc = graphed.tokenizer.encode(batch[0])
    expected = greedy_by_recompute(graphed.model, enc.tokens, enc.images, 12, stop_ids=(graphed.tokenizer.eos_id,))
    assert graphed.generate(batch[0], max_new_tokens=12).tokens == expected
    assert graphed.blocks.usage()["used_blocks"] == 0
