"""Whatever a user sends, Tokenizer.encode answers with tokens or a plain ValueError that says
what is wrong (never mistral_common's or pydantic's own exception types, never a KeyError or
TypeError); a tokenizer file that is not a multimodal Tekken file is a CheckpointError naming it."""
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.messages import AssistantMessage, TextChunk, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from PIL import Image

from pixtral_fast.tiny import tekken_file
from pixtral_fast.tokenizer import Encoded, Tokenizer
from pixtral_fast.weights import CheckpointError

TINY_PNG = Image.new("RGB", (20, 12), (200, 10, 10))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def refused(tok, request) -> str:
    with pytest.raises(ValueError) as info:
        tok.encode(request)
    assert type(info.value) is ValueError, f"{type(info.value).__module__}.{type(info.value).__name__}"
    return str(info.value)


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("request_, message", [
    ([U, A], r"cannot be tokenized: Expected last role User"),
    ([], "non-empty list of messages"),
    (None, "non-empty list of messages"),
    ("hello", "non-empty list of messages"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     r"messages\[0\].content\[0\]: an image_url part needs image_url.url"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "needs image_url.url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}], "needs image_url.url"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"messages\[0\].content\[0\]: a text part needs a string 'text'"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "needs a string 'text', got int"),
    ([{"role": "user", "content": [{"type": "video", "video": "x"}]}], "unknown part type 'video'"),
    ([{"role": "user", "content": [{"type": ["text"]}]}], "unknown part type"),
    ([{"role": "user", "content": ["hi"]}], r"content\[0\]: expected a dict with a 'type'"),
    ([{"role": "user", "content": None}], r"messages\[0\].content must be a string or a list of parts, got NoneType"),
    ([{"role": "user", "content": {"text": "x"}}], "must be a string or a list of parts, got dict"),
    ([{"role": "user"}], "must be a string or a list of parts"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\]: role must be user, assistant, system or tool, got 'robot'"),
    ([{"content": "x"}], "role must be"),
    ([{"role": "tool", "content": "x"}], r"messages\[0\]: a tool message needs tool_call_id"),
    (["hello"], r"malformed \(ChatCompletionRequest\): messages.0"),
    ([5], "malformed"),
    ([{"role": "system", "content": None}, U], r"messages\[0\]: a system message needs content"),
    ([{"role": "system", "content": 5}, U], "a string or a list of text parts, got int"),
    ([U, {"role": "assistant", "content": [{"type": "image", "image": TINY_PNG}]}, U], r"messages\[1\].content\[0\]: only text parts"),
    ([U, {"role": "assistant", "content": 5}, U], r"messages\[1\].content must be a string or a list of text parts"),
    ([U, {"role": "assistant", "content": None}, U], "cannot be tokenized"),
    ({"role": "user", "content": [{"type": "image", "image": None}]}, "expected a PIL image, a path, a data URL or image bytes, got NoneType"),
    ([{"role": "user", "content": [{"type": "image", "image": "/no/such.png"}]}], "no such image file"),
    (ChatCompletionRequest(messages=[UserMessage(content="a"), AssistantMessage(content="b")]), "Expected last role User"),
])
def test_malformed_requests(tok, request_, message):
    text = refused(tok, request_)
    assert re.search(message, text), text


def test_well_formed_variants_still_work(tok):
    for request in ([U], U, [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, U],
                    [U, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}, U],
                    [UserMessage(content=[TextChunk(text="hi")])],
                    [{"role": "user", "content": [{"type": "image", "image": TINY_PNG}, {"type": "text", "text": "?"}]}]):
        assert isinstance(tok.encode(request), Encoded)


# Messages built from plausible and implausible pieces: encode must answer with tokens or a plain ValueError.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=6), st.just(TINY_PNG),
                    st.sampled_from(["http://h/x.png", "data:image/png;base64,AAAA", "data:,x", "file:///nope.png", "ftp://x"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(["type", "text", "image", "image_url", "url", "role"]), inner, max_size=3),
                      max_leaves=8)
parts = st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "image_url", "video", 5])},
                              optional={"text": values, "image": values, "image_url": values})
contents = st.one_of(values, st.text(max_size=8), st.lists(parts, max_size=3))
messages = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", None, 3])},
                                 optional={"content": contents})
good_parts = st.one_of(st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=6)),
                       st.just({"type": "image", "image": TINY_PNG}))
good_user = st.builds(lambda c: {"role": "user", "content": c}, st.text(max_size=6) | st.lists(good_parts, max_size=3))
good_other = st.builds(lambda r, c: {"role": r, "content": c}, st.sampled_from(["assistant", "system"]), st.text(max_size=6))
requests = st.one_of(values, st.lists(messages | values, max_size=4), messages,
                     st.lists(st.one_of(good_user, good_other, messages), min_size=1, max_size=4).map(lambda m: m + [{"role": "user", "content": "?"}]),
                     st.lists(st.one_of(good_user, good_other), min_size=1, max_size=4))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests)
def test_any_structure_gives_tokens_or_a_plain_value_error(tok, request):
    try:
        out = tok.encode(request)
    except ValueError as e:
        assert type(e) is ValueError, f"{type(e).__module__}.{type(e).__name__}: {e}"
        assert str(e)
    else:
        assert isinstance(out, Encoded) and all(isinstance(t, int) for t in out.tokens)


# -- tokenizer files ------------------------------------------------------------------------------

DATA = tekken_file().parent


@pytest.fixture(scope="module")
def small_tekken():
    """A valid multimodal Tekken JSON with 300 ordinary tokens (loads in milliseconds)."""
    full = json.loads(tekken_file().read_text())
    return {"config": dict(full["config"], default_vocab_size=1300), "vocab": full["vocab"][:300],
            "image": full["image"]}


def write(folder, name, content):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if isinstance(content, dict):
        content = json.dumps(content)
    path.write_text(content) if isinstance(content, str) else path.write_bytes(content)
    return path


def test_small_tekken_loads(tmp_path, small_tekken):
    tok = Tokenizer.for_checkpoint(write(tmp_path, "tekken.json", small_tekken).parent)
    assert (tok.tekken.n_words, tok.eos_id, tok.max_image_side) == (1300, 2, 1024)


@pytest.mark.parametrize("content, message", [
    ("{not json", r"tekken.json is not a valid Tekken tokenizer file \(JSONDecodeError"),
    ("[]", "tekken.json is not a valid Tekken tokenizer file"),
    ('{"config": {}}', "tekken.json is not a valid Tekken tokenizer file"),
    (b"\x00\x01\x02binary", "tekken.json is not a valid Tekken tokenizer file"),
    ("version", r"tekken.json is not a valid Tekken tokenizer file \(ValueError: Unknown version: v99"),
    ("vocab", r"tekken.json is not a valid Tekken tokenizer file \(AssertionError"),
    ("no image", r"tekken.json has no image settings; Pixtral needs a multimodal Tekken"),
])
def test_bad_tekken_files(tmp_path, small_tekken, content, message):
    variants = {"version": dict(small_tekken, config=dict(small_tekken["config"], version="v99")),
                "vocab": dict(small_tekken, vocab=small_tekken["vocab"][:10]),
                "no image": {k: v for k, v in small_tekken.items() if k != "image"}}
    path = write(tmp_path / "ckpt", "tekken.json", variants.get(content, content))
    with pytest.raises(CheckpointError, match=message) as info:
        Tokenizer.for_checkpoint(tmp_path / "ckpt")
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match=message):
        Tokenizer.from_file(path)


def test_sentencepiece_and_misnamed_files(tmp_path, small_tekken):
    # A SentencePiece name without a multimodal version (tokenizer.model.v7, not .v7m1) has no image
    # settings. (Pixtral-Large's tokenizer.model.v7m1 itself loads: tests/test_family_tokens.py.)
    sp = (DATA / "mistral_instruct_tokenizer_241114.model.v7m1").read_bytes()
    path = write(tmp_path / "sp", "tokenizer.model.v7", sp)
    with pytest.raises(CheckpointError, match=rf"{path} is a SentencePiece tokenizer without image settings"):
        Tokenizer.for_checkpoint(path.parent)
    with pytest.raises(CheckpointError, match=rf"{path} is a SentencePiece tokenizer without image settings"):
        Tokenizer.from_file(path)
    path = write(tmp_path / "sp_named_tekken", "tekken.json", sp)
    with pytest.raises(CheckpointError, match=rf"{path} is not a valid Tekken tokenizer file"):
        Tokenizer.for_checkpoint(path.parent)
    path = write(tmp_path / "misnamed", "vocab.json", small_tekken)
    with pytest.raises(CheckpointError, match=rf"{path}: a Tekken tokenizer file must be named \*tekken\*.json"):
        Tokenizer.from_file(path)


def test_missing_file_and_folders(tmp_path, small_tekken):
    with pytest.raises(CheckpointError, match=r"nope.json: no such tokenizer file"):
        Tokenizer.from_file(tmp_path / "nope.json")
    params = write(tmp_path / "ckpt", "params.json", "{}")
    write(tmp_path / "ckpt", "tekken.json", small_tekken)
    assert Tokenizer.for_checkpoint(params).tekken.n_words == 1300  # a file in the folder finds it too
    assert Tokenizer.for_checkpoint(tmp_path / "empty").tekken.n_words == 131072  # none: Pixtral-12B's own
