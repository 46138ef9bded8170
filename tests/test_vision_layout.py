"""Image token layout, RoPE-2D angles and packing, each against a closed form computed here."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import pixtral_fast as pf
from pixtral_fast import reference
from pixtral_fast.config import IMG_BREAK_ID, IMG_END_ID, IMG_ID
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Tokenizer
from tests.support.hf_peer import image_tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.default()


def encode_image(tokenizer, width, height):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    return tokenizer.encode([{"role": "user", "content": [{"type": "image", "image": img},
                                                           {"type": "text", "text": "hi"}]}])


def test_4x3_patch_image_layout(tokenizer):
    enc = encode_image(tokenizer, width=64, height=48)  # 4 patches wide, 3 tall
    t = enc.tokens
    assert (t.count(IMG_ID), t.count(IMG_BREAK_ID), t.count(IMG_END_ID)) == (12, 2, 1)
    start = t.index(IMG_ID)
    assert t[start:start + 15] == [IMG_ID] * 4 + [IMG_BREAK_ID] + [IMG_ID] * 4 + [IMG_BREAK_ID] + [IMG_ID] * 4 + [IMG_END_ID]
    assert enc.images[0].shape == (3, 48, 64) and enc.images[0].dtype == np.float32


@pytest.mark.parametrize("width, height", [(16, 16), (160, 48), (48, 160), (2000, 1000)])
def test_layout_closed_form(tokenizer, width, height):
    enc = encode_image(tokenizer, width, height)
    _, h, w = enc.images[0].shape
    rows, cols = h // 16, w // 16
    assert max(h, w) <= 1024 and h % 16 == 0 and w % 16 == 0
    start = enc.tokens.index(IMG_ID)
    assert enc.tokens[start:start + rows * (cols + 1)] == image_tokens(rows, cols)
    assert enc.tokens.count(IMG_ID) == rows * cols and enc.tokens.count(IMG_BREAK_ID) == rows - 1


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_2d_angle_of_every_pair(head_dim):
    """Rotating the unit vector (1, 0) of pair i at (row, col) lands at the DESIGN §1 angle."""
    theta = 10000.0
    positions = [(0, 0), (0, 5), (7, 0), (13, 63), (63, 63)]
    pos = torch.tensor(positions, dtype=torch.int32)
    unit = torch.zeros(len(positions), 1, head_dim, dtype=torch.float64)
    unit[..., 0::2] = 1.0
    rotated, _ = reference.rope_2d(unit, unit, pos, theta)
    measured = torch.atan2(rotated[:, 0, 1::2], rotated[:, 0, 0::2])
    quarter = head_dim // 4
    for t, (row, col) in enumerate(positions):
        for i in range(head_dim // 2):
            f = [theta ** (-(2 * j) / head_dim) for j in range(head_dim // 2)]
            angle = row * f[2 * i] if i < quarter else col * f[2 * (i - quarter) + 1]
            wrapped = math.remainder(angle, 2 * math.pi)
            assert abs(measured[t, i].item() - wrapped) < 1e-5, (row, col, i)


def test_packing_independence(tiny_dir):
    model = pf.load_model(tiny_dir, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 48, 80, generator=g), torch.randn(3, 112, 32, generator=g)
    packed = model.encode_images([a, b])
    separate = torch.cat([model.encode_images([a]), model.encode_images([b])])
    assert packed.shape == (3 * 5 + 7 * 2, 64)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=0)


def test_bad_images_are_named(tiny_dir):
    model = pf.load_model(tiny_dir, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    with pytest.raises(ValueError, match=r"images\[1\] is 40x32"):
        model.encode_images([torch.zeros(3, 16, 16), torch.zeros(3, 40, 32)])
    with pytest.raises(ValueError, match=r"images\[0\] must be \[3, H, W\]"):
        model.encode_images([torch.zeros(1, 16, 16)])
    with pytest.raises(ValueError, match="larger than"):
        model.encode_images([torch.zeros(3, 16, 1040)])
    with pytest.raises(ValueError, match=r"images\[0\] has a 1x1 patch grid \(1 \[IMG\] tokens\) but its \[IMG\] block "
                                         r"at token 1 is rows of \[2\] \[IMG\] tokens \(2 in all\) not ended by \[IMG_END\]"):
        model(torch.tensor([1, IMG_ID, IMG_ID, 4]), [torch.zeros(3, 16, 16)])
    with pytest.raises(ValueError, match=r"images\[0\] holds non-finite pixels"):
        model(torch.tensor([1, IMG_ID, IMG_END_ID, 4]), [torch.full((3, 16, 16), float("nan"))])
    with pytest.raises(ValueError, match=r"image tokens at position 1 beyond the \[IMG\] blocks of the 0 images"):
        model(torch.tensor([1, IMG_ID, IMG_END_ID, 4]))
