"""Stop strings and the end of the text: StopMatcher (runtime/output.py) against a plain full-text
oracle over many ways of splitting the text into tokens, and the final flush of a character cut
in the middle, from the detokenizer up to the server's plain and streamed answers."""
import asyncio
import dataclasses
import json
import time

import httpx
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import pixtral_fast as pf
from pixtral_fast.runtime.async_engine import AsyncEngine
from pixtral_fast.runtime.output import StopMatcher
from pixtral_fast.runtime.detokenize import IncrementalDetokenizer
from pixtral_fast.serve.app import ServerSettings, build_app
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Tokenizer
from tests.support.serve_server import user_message

EOS = -1


def piece_matcher(pieces: list[str], stops: list[str]) -> StopMatcher:
    """A matcher whose token i decodes to pieces[i] (EOS is the stop token)."""
    return StopMatcher(lambda ids: "".join(pieces[i] for i in ids), stop_ids=[EOS], stops=stops)


def longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def oracle(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """What the text so far allows to be released after each piece, by full-text find: everything
    before the first stop once one is in the text; else all but the longest tail that could still
    begin a stop."""
    released, text = [], ""
    for piece in pieces:
        text += piece
        found = [at for s in stops if (at := text.find(s)) >= 0]
        if found:
            return released + [text[:min(found)]], True
        released.append(text[:len(text) - longest_stop_prefix_suffix(text, stops)])
    return released, False


def run(pieces: list[str], stops: list[str]) -> tuple[list[str], bool, str]:
    """The released text after each piece (cumulative), whether it stopped, and the final text."""
    matcher, out, released = piece_matcher(pieces, stops), "", []
    for token in range(len(pieces)):
        out += matcher.push(token)
        released.append(out)
        if matcher.stopped:
            return released, True, out
    return released, False, out + matcher.finish()


def test_a_stop_split_over_pieces_c_dS_TOP_stops_before_it():
    released, stopped, text = run(["c", "dS", "TOP"], ["dST"])
    assert stopped and text == "c"
    assert released == ["c", "c", "c"]  # "dS" may begin "dST": held back, then dropped with it


PIECE = st.text(alphabet="abcd", max_size=4)
STOP = st.text(alphabet="abcd", min_size=1, max_size=5)


@settings(max_examples=600, deadline=None)
@given(pieces=st.lists(PIECE, max_size=12), stops=st.lists(STOP, min_size=1, max_size=3))
@example(pieces=["c", "dS", "TOP"], stops=["dST"])
@example(pieces=["a", "b", "ca", "bcd"], stops=["abcd", "bc"])
@example(pieces=["aa", "a", "ab"], stops=["aaab"])
def test_released_text_equals_the_full_text_oracle_after_every_piece(pieces, stops):
    released, stopped, text = run(pieces, stops)
    expected, expected_stop = oracle(pieces, stops)
    assert stopped == expected_stop
    assert released == expected  # never a character of a stop, never one held too long
    full = "".join(pieces)
    assert text == (expected[-1] if stopped else full)


def test_the_stop_token_adds_no_text_and_the_end_releases_a_held_prefix():
    pieces = ["ab", "cd"]
    matcher = piece_matcher(pieces, ["dX"])
    assert matcher.push(0) == "ab" and matcher.push(1) == "c"
    assert matcher.push(EOS) == "" and matcher.finish() == "d" and not matcher.stopped


def test_matching_a_long_stop_costs_time_linear_in_its_length():
    """A stop of 20,000 characters over 200 tokens that keep matching its beginning: with the
    holdback found by trying every prefix length this took minutes; scanning only the held
    tail plus the new text it takes milliseconds."""
    stop = "a" * 19_999 + "b"
    matcher = piece_matcher(["a"] * 200 + ["b"], [stop])
    started = time.perf_counter()
    assert all(matcher.push(i) == "" for i in range(200))
    assert matcher.finish() == "a" * 200
    assert time.perf_counter() - started < 1.0


# -- the end of the text: a character cut in the middle ---------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def cut_mid_character(tok) -> list[int]:
    """Token ids of 'ok é…' cut inside a multi-byte character, as max_tokens can cut it."""
    ids = tok.tekken.encode("ok \U0001d518\U0001d52b", bos=False, eos=False)
    cuts = [ids[:n] for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd")]
    assert cuts, "the text must hold a character spread over several tokens"
    return cuts[0]


def test_the_final_flush_emits_a_cut_character_as_decode_does(tok):
    ids = cut_mid_character(tok)
    detok = IncrementalDetokenizer(tok.decode)
    pushed = "".join(detok.push(i) for i in ids)
    assert not pushed.endswith("\ufffd")  # held back while the character could still complete
    assert pushed + detok.flush() == tok.decode(ids)
    assert tok.decode(ids).startswith("ok ") and tok.decode(ids).endswith("\ufffd")


def test_a_matcher_ends_with_the_text_decode_gives_for_a_cut_character(tok):
    ids = cut_mid_character(tok)
    matcher = StopMatcher(tok.decode, stop_ids=[tok.eos_id], stops=["never"])
    text = "".join(matcher.push(i) for i in ids) + matcher.finish()
    assert text == tok.decode(ids)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    model = pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    return model, Tokenizer.for_checkpoint(folder)


def scripted(engine, script: list[int]):
    """The engine samples `script` (then whatever the model picks): new token i is script[i]."""
    record = engine._record

    def record_script(seqs, out):
        tokens = [script[len(seq.generated)] if len(seq.generated) < len(script) else token
                  for seq, token in zip(seqs, out.tokens)]
        return record(seqs, dataclasses.replace(out, tokens=tokens))
    engine._record = record_script
    return engine


async def ask(engine, bodies: list[dict]) -> list[httpx.Response]:
    ae = AsyncEngine(engine).start()
    app = build_app(ae, ServerSettings(model_name="m"))
    app.state.server.http = httpx.AsyncClient()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return [await client.post("/v1/chat/completions", json=body) for body in bodies]
    finally:
        await ae.aclose()


def answer(response: httpx.Response) -> tuple[str, str]:
    """(text, finish_reason) of a plain or streamed one-choice answer."""
    if not response.headers["content-type"].startswith("text/event-stream"):
        choice = response.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    choices = [c for e in events for c in e["choices"]]
    return "".join(c["delta"].get("content") or "" for c in choices), choices[-1]["finish_reason"]


@pytest.mark.parametrize("end", ["length", "stop token"])
def test_an_answer_cut_mid_character_ends_as_decode_of_its_ids_plain_and_streamed(tiny, end):
    """max_tokens (or the end-of-sequence token) right after the first bytes of a character:
    the final flush gives its U+FFFD, as tokenizer.decode(ids) does, in both kinds of answer."""
    tok = tiny[1]
    ids = cut_mid_character(tok)
    script, max_tokens = (ids, len(ids)) if end == "length" else (ids + [tok.eos_id], len(ids) + 4)
    engine = scripted(pf.Engine.from_model(*tiny, num_blocks=64, progress=False), script)
    body = {"messages": user_message("Hello?"), "max_tokens": max_tokens, "temperature": 0}
    plain, streamed = asyncio.run(ask(engine, [body, {**body, "stream": True}]))
    expected = (tok.decode(ids), "length" if end == "length" else "stop")
    assert expected[0].endswith("\ufffd")
    assert answer(plain) == expected and answer(streamed) == expected


# -- detokenizing runs that never complete a character ------------------------------------------

def byte_id(tok, value: int) -> int:
    return tok.tekken.num_special_tokens + value


def counting(decode):
    """decode, counting the ids it is handed over all calls."""
    def wrapper(ids):
        wrapper.ids += len(ids)
        return decode(ids)
    wrapper.ids = 0
    return wrapper


@pytest.mark.parametrize("run", ["invalid bytes", "ids without text"])
def test_a_long_run_without_a_whole_character_is_decoded_in_linear_time(tok, run):
    """4,000 lone 0xFF bytes (each its own U+FFFD), or 4,000 [IMG] ids (no text): re-decoding the
    whole held run at every token handed decode 8 million ids (2,000 a token); settled runs keep each token's
    work constant, and the bytes are released as they come, not all at the end."""
    ids = [byte_id(tok, 0xFF) if run == "invalid bytes" else 10] * 4000
    decode = counting(tok.decode)
    detok = IncrementalDetokenizer(decode)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) + detok.flush() == tok.decode(ids)
    assert decode.ids < 100 * len(ids)
    assert len("".join(pieces)) >= len(tok.decode(ids)) - 16


SPECIAL = [3, 10, 12]   # [INST], [IMG], [IMG_BREAK]: decode to no text and split the byte stream
LEADS_AND_TAILS = [0xE6, 0x9D, 0xB1, 0xF0, 0x9F, 0x98, 0x80, 0xC3, 0xA9, 0xFF, 0x41]


KIND = st.sampled_from(["byte"] * 6 + ["word", "special"])   # mostly bytes: long held runs


@settings(max_examples=300, deadline=None)
@given(kinds=st.lists(st.tuples(KIND, st.integers(0, 10**6)), max_size=60))
@example(kinds=[("byte", 9)] * 7 + [("byte", 0), ("byte", 1), ("byte", 2)])  # 0xFF x 7 then 東: settled inside 東
@example(kinds=[("special", 0)] * 70 + [("byte", 7), ("byte", 8)])            # no text for 70 ids, then é
def test_increments_and_flush_add_up_to_decode_of_every_id_mixture(tok, kinds):
    ids = []
    for kind, k in kinds:
        if kind == "byte":
            ids.append(byte_id(tok, LEADS_AND_TAILS[k % len(LEADS_AND_TAILS)]))
        elif kind == "word":
            ids.append(tok.tekken.num_special_tokens + 256 + k % 100_000)
        else:
            ids.append(SPECIAL[k % len(SPECIAL)])
    detok = IncrementalDetokenizer(tok.decode)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == tok.decode(ids)


def test_a_character_is_not_split_by_ids_that_decode_to_nothing_between_its_bytes():
    """With a decoder where some ids give no text and do not break the byte stream (as a stop
    token in tests/test_async_engine.py), a run of them inside a character is no boundary."""
    pieces = {1: "\u6771".encode()[:1], 2: "\u6771".encode()[1:2], 3: "\u6771".encode()[2:], 9: b""}

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")
    ids = [1] + [9] * 20 + [2, 3]
    detok = IncrementalDetokenizer(decode)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == "\u6771"
