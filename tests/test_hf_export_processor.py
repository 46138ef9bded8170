"""export-hf's tokenizer and processor files (issue 18, item 5): transformers loads them, and a chat
with images becomes the same token ids, the same pixels and the same greedy tokens on the
transformers side as in our engine (mistral_common's v3 Tekken encoding)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from pixtral_fast.hf_export import convert_consolidated_to_hf  # noqa: E402
from pixtral_fast.tiny import make_tiny  # noqa: E402
from pixtral_fast.tokenizer import Tokenizer  # noqa: E402
from tests.support.hf_generate import hf_greedy, hf_inputs, uses_processor  # noqa: E402

FILES = ["chat_template.jinja", "generation_config.json", "preprocessor_config.json", "processor_config.json",
         "tokenizer.json", "tokenizer_config.json"]
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "[IMG]": 10, "<pad>": 11,
            "[IMG_BREAK]": 12, "[IMG_END]": 13}
# bicubic in mistral_common (OpenCV, on float pixels) and in transformers (PIL, on uint8) differ
# wherever an image is resized; measured on the two images below: max 0.61, mean 0.048 (normalised
# units; a 1500x700 image shrunk to 1024 wide: max 0.90, mean 0.090). Unresized images are equal.
RESIZED_MAX, RESIZED_MEAN = 0.8, 0.06


def shape_picture(w: int, h: int, seed: int) -> Image.Image:
    """A coloured rectangle on noise: edges and texture, so resampling differences show."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    pixels[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = (220, 30, 40)
    return Image.fromarray(pixels)


def chat(*images: Image.Image, text: str = "what color is the shape?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": im} for im in images]
             + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(consolidated folder, HF folder): a tiny random Pixtral-12B exported in fp32."""
    root = tmp_path_factory.mktemp("hf_export_processor")
    src = make_tiny(root / "ours", seed=0)
    return src, convert_consolidated_to_hf(src, root / "hf", dtype=torch.float32)


@pytest.fixture(scope="module")
def ours(exported):
    return Tokenizer.for_checkpoint(exported[0])


def test_export_writes_tokenizer_processor_and_generation_files(exported):
    from transformers import AutoTokenizer

    _, hf = exported
    assert set(FILES) <= {p.name for p in hf.iterdir()}
    # A tekken.json would make transformers pick mistral_common's backend over these files.
    assert not (hf / "tekken.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIALS} == SPECIALS
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert json.loads((hf / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    processor = json.loads((hf / "processor_config.json").read_text())
    assert processor["processor_class"] == "PixtralProcessor"
    assert (processor["patch_size"], processor["spatial_merge_size"]) == (16, 1)
    assert (processor["image_token"], processor["image_break_token"], processor["image_end_token"]) == \
        ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
    images = json.loads((hf / "preprocessor_config.json").read_text())
    assert images["image_processor_type"] == "PixtralImageProcessor"
    assert images["size"] == {"longest_edge": 1024} and images["patch_size"] == {"height": 16, "width": 16}
    assert images["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert images["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    generation = json.loads((hf / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 11)


@pytest.mark.skipif(not uses_processor(), reason="transformers builds PixtralProcessor only with torchvision")
def test_auto_processor_loads(exported):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(exported[1])
    assert type(processor).__name__ == "PixtralProcessor"
    assert processor.image_token_ids == [10, 12, 13]
    assert (processor.patch_size, processor.spatial_merge_size) == (16, 1)


def _hf_images(inputs) -> list[np.ndarray]:
    """The processor pads a batch's images to the largest; each one cropped back to its size."""
    return [inputs["pixel_values"][i, :, :h, :w].float().numpy()
            for i, (h, w) in enumerate(inputs["image_sizes"].tolist())]


def test_chat_tokens_and_pixels_equal_ours(exported, ours):
    """Sides that are multiples of 16 and at most 1024 are not resized: the pixels are equal too."""
    messages = chat(shape_picture(64, 64, 0), shape_picture(96, 48, 1))
    inputs = hf_inputs(exported[1], messages)
    expected = ours.encode(messages)
    assert inputs["input_ids"][0].tolist() == expected.tokens
    assert expected.tokens[:2] == [1, 3] and expected.tokens[-1] == 4
    assert inputs["attention_mask"].all()
    hf_images = _hf_images(inputs)
    assert [im.shape for im in hf_images] == [im.shape for im in expected.images]
    for theirs, mine in zip(hf_images, expected.images):
        np.testing.assert_allclose(theirs, mine, atol=1e-6, rtol=0)


def test_resized_images_same_tokens_close_pixels(exported, ours):
    """A resized image (100x40 grows to 112x48): the same tokens; the pixels as close as two bicubic
    implementations get."""
    messages = chat(shape_picture(100, 40, 2), shape_picture(30, 70, 3), text="and these?")
    inputs = hf_inputs(exported[1], messages)
    expected = ours.encode(messages)
    assert inputs["input_ids"][0].tolist() == expected.tokens
    for theirs, mine in zip(_hf_images(inputs), expected.images):
        assert theirs.shape == mine.shape
        diff = np.abs(theirs - mine)
        assert diff.max() < RESIZED_MAX and diff.mean() < RESIZED_MEAN, (diff.max(), diff.mean())


def test_greedy_generation_equals_engine(exported):
    from pixtral_fast.runtime.engine import Engine

    src, hf = exported
    chats = [chat(shape_picture(64, 64, 0), shape_picture(96, 48, 1)), chat(shape_picture(32, 80, 4), text="hi")]
    engine = Engine.from_pretrained(src, device="cpu", dtype=torch.float32, backend="reference")
    mine = [engine.generate(engine.tokenizer.encode(messages), max_new_tokens=5).tokens for messages in chats]
    assert hf_greedy(hf, chats, max_new_tokens=5) == mine
    assert all(len(tokens) == 5 for tokens in mine)  # random weights: no early eos to hide a difference


TEXTS = ["hello world", "  two leading spaces,  double  inside ", "naïve café — 東京 🙂 Ünïcödé",
         "line one\nline two\ttab", "x = f(y) + 42 # comment"]


@pytest.mark.parametrize("text", TEXTS)
def test_text_encodes_and_decodes_like_ours(exported, ours, text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported[1])
    ids = ours.tekken.encode(text, bos=False, eos=False)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert tokenizer.decode(ids) == ours.decode(ids) == text


def test_sentencepiece_checkpoint_exports_weights_and_warns(tmp_path):
    src = make_tiny(tmp_path / "large", seed=0, variant="pixtral-large")
    with pytest.warns(UserWarning, match="SentencePiece"):
        hf = convert_consolidated_to_hf(src, tmp_path / "hf")
    assert {p.name for p in hf.iterdir()} == {"config.json", "model.safetensors"}


def test_missing_transformers_names_the_install_before_writing(tmp_path, monkeypatch, exported):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match="pip install"):
        convert_consolidated_to_hf(exported[0], tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
