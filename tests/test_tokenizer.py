"""The tokenizer wrapper over mistral_common with the real Tekken file (shipped in the package,
no network): every image form gives the same tokens, and every bad input names itself."""
import base64
import io

import numpy as np
import pytest
from mistral_common.protocol.instruct.messages import ImageChunk, TextChunk, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from PIL import Image

from pixtral_fast.config import IMG_ID
from pixtral_fast.tiny import tekken_file
from pixtral_fast.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(tekken_file())


@pytest.fixture
def picture():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8))


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def test_real_tekken_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.tekken.n_words) == (1, 2, 131072)
    assert tok.tekken.get_special_token("[IMG]") == IMG_ID


def test_text_round_trip(tok):
    enc = tok.encode([{"role": "user", "content": "Où est la gare? 東京"}])
    assert enc.tokens[:2] == [1, 3] and enc.tokens[-1] == 4 and enc.images == []
    assert tok.decode(enc.tokens[2:-1]) == "Où est la gare? 東京"


def test_image_forms_agree(tok, picture, tmp_path):
    path = tmp_path / "p.png"
    picture.save(path)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    text = {"type": "text", "text": "What is this?"}
    forms = [
        user({"type": "image", "image": picture}, text),
        user({"type": "image", "image": str(path)}, text),
        user({"type": "image", "image": path}, text),
        user({"type": "image", "image": url}, text),
        user({"type": "image_url", "image_url": {"url": url}}, text),
        ChatCompletionRequest(messages=[UserMessage(content=[ImageChunk(image=picture), TextChunk(text="What is this?")])]),
    ]
    encs = [tok.encode(f) for f in forms]
    for e in encs[1:]:
        assert e.tokens == encs[0].tokens
        np.testing.assert_array_equal(e.images[0], encs[0].images[0])
    assert encs[0].images[0].shape == (3, 48, 80)
    assert encs[0].tokens.count(IMG_ID) == 3 * 5


def test_multi_turn_with_system(tok):
    enc = tok.encode([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}])
    assert "Be brief." in tok.decode(enc.tokens) and "Hello" in tok.decode(enc.tokens)


def test_missing_file(tok, tmp_path):
    with pytest.raises(ValueError, match=r"content\[0\]: no such image file"):
        tok.encode(user({"type": "image", "image": str(tmp_path / "nope.png")}))


def test_not_an_image(tok, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("certainly not a PNG")
    with pytest.raises(ValueError, match="bad.png is not a readable image"):
        tok.encode(user({"type": "image", "image": bad}))


def test_bad_data_url(tok):
    with pytest.raises(ValueError, match="data URL does not hold a readable image"):
        tok.encode(user({"type": "image", "image": "data:image/png;base64," + base64.b64encode(b"xyz").decode()}))


def test_zero_size_image(tok):
    with pytest.raises(ValueError, match="zero size"):
        tok.encode(user({"type": "image", "image": Image.new("RGB", (0, 10))}))


def test_wrong_type_and_role(tok):
    with pytest.raises(ValueError, match="expected a PIL image, a path, a data URL or image bytes, got int"):
        tok.encode(user({"type": "image", "image": 7}))
    with pytest.raises(ValueError, match="role must be"):
        tok.encode([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="unknown part type 'video'"):
        tok.encode(user({"type": "video", "video": "x"}))
