"""Streaming text: increments never split a multi-byte character and add up to the whole text."""
import pytest

from pixtral_fast.runtime.detokenize import IncrementalDetokenizer
from pixtral_fast.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


@pytest.mark.parametrize("text", ["plain ascii words", "東京タワーと富士山 🙂🙃 ok", "naïve café — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "😀" * 5])
def test_increments(tok, text):
    ids = tok.tekken.encode(text, bos=False, eos=False)
    detok = IncrementalDetokenizer(tok.decode)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_byte_tokens_split_a_character(tok):
    """At least one character of this text spans several tokens, so holding back is exercised."""
    ids = tok.tekken.encode("𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀", bos=False, eos=False)
    detok = IncrementalDetokenizer(tok.decode)
    assert "" in [detok.push(i) for i in ids]
