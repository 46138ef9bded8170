"""Pixtral.check_request: every request (Encoded included) is checked on the host against the
model before it joins a batch: token ids, image tensors, and each image's own [IMG] row/column
layout. The expected layouts are built here from DESIGN §1, not with the code under test."""
import dataclasses
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pixtral_fast.config import IMG_BREAK_ID, IMG_END_ID, IMG_ID
from pixtral_fast.model.pixtral import build_model
from pixtral_fast.tiny import TINY_ARGS
from pixtral_fast.tokenizer import Tokenizer

P = TINY_ARGS.vision.patch_size


@pytest.fixture(scope="module")
def model():
    return build_model(TINY_ARGS, device="meta")


def block(rows, cols):
    out = []
    for r in range(rows):
        out += [IMG_ID] * cols + [IMG_BREAK_ID if r < rows - 1 else IMG_END_ID]
    return out


def prompt(*grids, text=(1, 3)):
    """[BOS] [INST] then each grid's block followed by some text tokens."""
    out = list(text)
    for rows, cols in grids:
        out += block(rows, cols) + [1000, 1001]
    return out + [4]


def pixels(rows, cols, value=0.0):
    return torch.full((3, rows * P, cols * P), value)


def test_tokenizer_output_passes(model):
    tok = Tokenizer.default()
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 70), (90, 20)]]
    enc = tok.encode([{"role": "user", "content": [{"type": "image", "image": imgs[0]}, {"type": "text", "text": "a"},
                                                   {"type": "image", "image": imgs[1]}]}])
    model.check_request(enc.tokens, enc.images)
    with pytest.raises(ValueError, match=r"images\[0\] has a 6x2 patch grid \(12 \[IMG\] tokens\) but its "
                                         r"\[IMG\] block at token \d+ is 3 rows of \[5, 5, 5\]"):
        model.check_request(enc.tokens, enc.images[::-1])


def test_same_total_other_layout_refused(model):
    # 3x4 and 4x3 both hold 12 patches: a total-count check would pass this.
    with pytest.raises(ValueError, match=r"images\[0\] has a 4x3 patch grid \(12 \[IMG\] tokens\) but its \[IMG\] "
                                         r"block at token 2 is 3 rows of \[4, 4, 4\] \[IMG\] tokens \(12 in all\)"):
        model.check_request(prompt((3, 4)), [pixels(4, 3)])
    # Two images in swapped order, and a block whose rows differ in length.
    with pytest.raises(ValueError, match=r"images\[0\] has a 1x2 patch grid"):
        model.check_request(prompt((2, 1), (1, 2)), [pixels(1, 2), pixels(2, 1)])
    ragged = [1, 3] + [IMG_ID] * 3 + [IMG_BREAK_ID] + [IMG_ID] * 2 + [IMG_BREAK_ID] + [IMG_ID] + [IMG_END_ID, 4]
    with pytest.raises(ValueError, match=r"3 rows of \[3, 2, 1\]"):
        model.check_request(ragged, [pixels(3, 2)])


def test_missing_extra_and_unclosed_blocks(model):
    model.check_request(prompt((2, 3), (1, 1)), [pixels(2, 3), pixels(1, 1)])
    with pytest.raises(ValueError, match=r"images\[1\] has a 1x1 patch grid but the tokens hold no \[IMG\] block"):
        model.check_request(prompt((2, 3)), [pixels(2, 3), pixels(1, 1)])
    with pytest.raises(ValueError, match=r"image tokens at position \d+ beyond the \[IMG\] blocks of the 1 images"):
        model.check_request(prompt((2, 3), (1, 1)), [pixels(2, 3)])
    with pytest.raises(ValueError, match=r"beyond the \[IMG\] blocks of the 0 images"):
        model.check_request([1, 3, IMG_END_ID, 4], [])
    unclosed = [1, 3] + [IMG_ID] * 2 + [IMG_BREAK_ID] + [IMG_ID] * 2 + [4]
    with pytest.raises(ValueError, match=r"rows of \[2, 2\] \[IMG\] tokens \(4 in all\) not ended by \[IMG_END\] "
                                         r"\(token 7 is 4\)"):
        model.check_request(unclosed, [pixels(2, 2)])
    with pytest.raises(ValueError, match="the end of the prompt"):
        model.check_request([1, 3, IMG_ID, IMG_ID], [pixels(1, 2)])


@pytest.mark.parametrize("bad, message", [
    (float("nan"), "non-finite pixels"), (float("inf"), "non-finite pixels"), (-float("inf"), "non-finite pixels")])
def test_non_finite_pixels(model, bad, message):
    img = pixels(2, 2)
    img[1, 5, 7] = bad
    with pytest.raises(ValueError, match=rf"images\[1\] holds {message}"):
        model.check_request(prompt((1, 1), (2, 2)), [pixels(1, 1), img])
    with pytest.raises(ValueError, match=rf"images\[0\] holds {message}"):
        model.check_request(prompt((2, 2)), [img.numpy()])


def test_image_tensors(model):
    with pytest.raises(ValueError, match=r"images\[0\] must hold floating-point pixels .* torch.uint8"):
        model.check_request(prompt((1, 1)), [torch.zeros(3, P, P, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"images\[0\] must be \[3, H, W\]"):
        model.check_request(prompt((1, 1)), [torch.zeros(P, P)])
    with pytest.raises(ValueError, match=r"images\[0\] is 16x17"):
        model.check_request(prompt((1, 1)), [torch.zeros(3, P, P + 1)])
    with pytest.raises(ValueError, match="larger than the encoder's 1024px limit"):
        model.check_request(prompt((1, 65)), [pixels(1, 65)])
    with pytest.raises(ValueError, match=r"images\[0\] is not an array of pixels"):
        model.check_request(prompt((1, 1)), ["a picture"])
    with pytest.raises(ValueError, match="images must be a list"):
        model.check_request(prompt((1, 1)), pixels(1, 1))


@pytest.mark.parametrize("tokens, message", [
    ([1, 131072], r"token ids must lie in \[0, 131072\); got 131072"),
    ([1, -1], "got -1"),
    ([1, 2**70], r"tokens\[1\] = 1180591620717411303424 is not a token id"),
    ([1, 2.0], r"tokens\[1\] must be an int token id, got 2.0"),
    ([1, True], r"tokens\[1\] must be an int token id, got True"),
    ([1, "5"], r"tokens\[1\] must be an int token id"),
    ("1 2 3", "tokens must be a list of token ids, got str"),
    (np.array([[1, 2]]), "tokens must be a 1-D array of integer ids"),
    (np.array([1.0, 2.0]), "tokens must be a 1-D array of integer ids"),
])
def test_bad_tokens(model, tokens, message):
    with pytest.raises(ValueError, match=message):
        model.check_request(tokens, [])


def test_text_only_model_refuses_images():
    text_only = build_model(dataclasses.replace(TINY_ARGS, vision=None), device="meta")
    text_only.check_request([1, 3, IMG_ID, 4], [])  # no vision: [IMG] is an ordinary id there
    with pytest.raises(ValueError, match="no vision encoder; it cannot take images"):
        text_only.check_request([1, 3, 4], [pixels(1, 1)])


grids = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), max_size=3)


def layout_oracle(tokens, image_grids) -> bool:
    """Spelled as a regular expression over the token stream: text, then each image's block
    (contiguous), text between them, nothing image-like anywhere else."""
    letters = {IMG_ID: "i", IMG_BREAK_ID: "b", IMG_END_ID: "e"}
    spelled = "".join(letters.get(t, ".") for t in tokens)
    blocks = ["b".join("i" * c for _ in range(r)) + "e" for r, c in image_grids]
    return re.fullmatch(r"\.*" + r"\.*".join(blocks) + r"\.*", spelled) is not None


@settings(max_examples=80, deadline=None)
@given(token_grids=grids, image_grids=grids, same=st.booleans(), corrupt=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(
    [IMG_ID, IMG_BREAK_ID, IMG_END_ID, 1000])), max_size=2))
def test_layout_property(model, token_grids, image_grids, same, corrupt):
    """Accepted exactly when the tokens hold the images' grids in order, each block intact."""
    image_grids = token_grids if same else image_grids
    tokens = prompt(*token_grids)
    for at, value in corrupt:
        tokens[at % len(tokens)] = value
    images = [pixels(r, c) for r, c in image_grids]
    if layout_oracle(tokens, image_grids):
        model.check_request(tokens, images)
    else:
        with pytest.raises(ValueError, match=r"images\[\d+\] has a|beyond the \[IMG\] blocks"):
            model.check_request(tokens, images)


def test_oracle_sees_both_outcomes():
    assert layout_oracle(prompt((2, 3)), [(2, 3)]) and not layout_oracle(prompt((3, 2)), [(2, 3)])
