"""The model on our kernels (backend="fast": Triton under the interpreter on the CPU) against the
same model on the plain-PyTorch reference: ViT, full forward, and engine decoding."""
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Encoded
from tests.conftest import DEVICE
from tests.support.hf_peer import image_tokens
from tests.support.recompute import greedy_by_recompute
from tests.tolerances import MODEL_FP32_ATOL


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    load = lambda backend: pf.load_model(folder, device=DEVICE, dtype=torch.float32, backend=backend,  # noqa: E731
                                         progress=False)
    return load("fast"), load("reference")


def images():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 48, 80, generator=g), torch.randn(3, 16, 16, generator=g), torch.randn(3, 64, 32, generator=g)]


def test_backends(models):
    fast, ref = models
    assert (fast.backend, ref.backend) == ("fast", "reference")


def test_fast_vit_equals_reference(models):
    fast, ref = models
    a, b = fast.encode_images(images()), ref.encode_images(images())
    assert a.shape == b.shape == (15 + 1 + 8, 64)
    torch.testing.assert_close(a, b, atol=MODEL_FP32_ATOL, rtol=0)


def test_fast_logits_equal_reference(models):
    fast, ref = models
    tokens = [1, 3] + image_tokens(3, 5) + image_tokens(1, 1) + image_tokens(4, 2) + [2000, 2001, 2002, 4]
    a = fast(torch.tensor(tokens), images())
    b = ref(torch.tensor(tokens), images())
    torch.testing.assert_close(a, b, atol=MODEL_FP32_ATOL, rtol=0)


def test_fast_engine_equals_full_recompute(models):
    """The engine on our kernels (paged prefill through causal varlen attention and RoPE-1D,
    Triton decode attention, the fused FFN) gives, token for token, greedy full recomputation
    on the reference."""
    fast, ref = models
    prompt = Encoded(tokens=[1, 3] + image_tokens(3, 5) + [2000, 2001, 4], images=images()[:1])
    got = pf.Engine.from_model(fast, num_blocks=32, progress=False).generate(prompt, max_new_tokens=40)
    assert got.tokens == greedy_by_recompute(ref, prompt.tokens, prompt.images, 40)
