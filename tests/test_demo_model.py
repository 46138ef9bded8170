"""The shipped easy-VQA model (pixtral_fast/demo_model) as an end-to-end check: preprocessing, the
ViT, RoPE-2D, the adapter, the decoder and sampling together must give the right answers.

Its accuracy on a fixed test sample is held (the full test split is bench/demo_accuracy.py);
every other path must answer the sample as the fp32 reference does; and deliberately broken
paths must answer worse, so the check can fail. The model does not reach issue 18's 97% yet,
and two of the three broken paths do not move its answers: both are strict xfails that say so."""
from __future__ import annotations

import base64

import openai
import pytest
import torch
import torch.nn.functional as F

from pixtral_fast import easy_vqa
from pixtral_fast.config import IMG_BREAK_ID
from pixtral_fast.model import vision
from pixtral_fast.model.load import load_model
from pixtral_fast.model.text import AttentionMetadata
from pixtral_fast.quantize_checkpoint import quantize_checkpoint
from pixtral_fast.runtime.engine import Engine
from pixtral_fast.tokenizer import Tokenizer
from pixtral_fast.train_demo import SHIPPED_DIR

from tests.support.env import DEVICE
from tests.support.serve_server import CPU_ARGS, ServerProcess

BAR = 0.97                  # issue 18's: greedy, fp32, reference
SHIPPED = 0.90              # what the shipped model scores on SAMPLE (fp32, reference): held, not a tolerance
QUANT_DROP = 0.01           # a quantized model may lose at most one point
SAMPLE = easy_vqa.sample("test", 200)
SMALL = SAMPLE[:32]         # the slow paths: the interpreter, TP workers, HTTP


def answers(engine, qs, batch_size=64) -> list[str]:
    return easy_vqa.evaluate(engine, qs, batch_size=batch_size).answers


def accuracy(qs, got) -> float:
    return sum(a == q.answer for q, a in zip(qs, got)) / len(qs)


@pytest.fixture(scope="module")
def reference():
    with Engine.from_pretrained(SHIPPED_DIR, device="cpu", dtype=torch.float32, backend="reference") as engine:
        yield engine, answers(engine, SAMPLE)


def test_the_shipped_model_keeps_its_accuracy(reference):
    _, got = reference
    assert accuracy(SAMPLE, got) >= SHIPPED, str(easy_vqa.Evaluation(SAMPLE, got))


@pytest.mark.xfail(strict=True, reason="the shipped model scores 90% on the sample (86.2% on all 9,673 test "
                   "questions: shapes 45%); 97% needs a better training recipe within train-demo's 15 minutes (issue 18)")
def test_the_shipped_model_meets_the_bar(reference):
    _, got = reference
    assert accuracy(SAMPLE, got) >= BAR


@pytest.mark.parametrize("batch_size", [1, 16])
def test_batch_size_changes_no_answer(reference, batch_size):
    engine, got = reference
    assert answers(engine, SMALL, batch_size) == got[:len(SMALL)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_our_kernels_answer_alike(reference, dtype):
    """backend='fast': the Triton kernels (under the interpreter on the CPU)."""
    _, got = reference
    with Engine.from_pretrained(SHIPPED_DIR, device=DEVICE, dtype=dtype,
                                backend="fast") as engine:
        assert answers(engine, SMALL, 16) == got[:len(SMALL)]


@pytest.mark.parametrize("scheme", ["w4a16", "fp8"])
def test_quantized_models_keep_the_accuracy(reference, tmp_path, scheme):
    _, got = reference
    folder = quantize_checkpoint(SHIPPED_DIR, tmp_path / scheme, scheme, progress=False)
    with Engine.from_pretrained(folder, device="cpu", dtype=torch.float32, backend="reference") as engine:
        quantized = answers(engine, SAMPLE)
    assert accuracy(SAMPLE, quantized) >= accuracy(SAMPLE, got) - QUANT_DROP


def test_tensor_parallel_answers_alike(reference):
    _, got = reference
    with Engine.from_pretrained(SHIPPED_DIR, tensor_parallel_size=2, device="cpu", dtype=torch.float32,
                                backend="reference") as engine:
        assert answers(engine, SMALL, 16) == got[:len(SMALL)]


def test_the_server_answers_alike(reference, tmp_path):
    """The real server process and the official client, each image sent as a data URL."""
    _, got = reference
    server = ServerProcess(["--tiny", *CPU_ARGS], tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        served = []
        for q in SMALL:
            url = "data:image/png;base64," + base64.b64encode(q.image_path.read_bytes()).decode()
            reply = client.chat.completions.create(model="pixtral-fast-tiny", max_tokens=4, temperature=0,
                                                   messages=easy_vqa.messages(q, image_url=url))
            choice = reply.choices[0]
            served.append(choice.message.content.strip() + ("" if choice.finish_reason == "stop" else " ..."))
    finally:
        server.terminate()
    assert served == got[:len(SMALL)]


def test_transformers_answers_alike_from_the_export(reference, tmp_path):
    """export-hf, then transformers as a user runs it: the processor's inputs from a chat with the
    image, generate() greedily."""
    from PIL import Image

    from pixtral_fast.hf_export import convert_consolidated_to_hf
    from tests.support.hf_generate import hf_greedy

    _, got = reference
    folder = convert_consolidated_to_hf(SHIPPED_DIR, tmp_path / "hf")
    chats = [[{"role": "user", "content": [{"type": "image", "image": Image.open(q.image_path).convert("RGB")},
                                           {"type": "text", "text": q.text}]}] for q in SMALL]
    tokenizer = Tokenizer.for_checkpoint(SHIPPED_DIR)
    hf = []
    for ids in hf_greedy(folder, chats, max_new_tokens=4):
        ended = bool(ids) and ids[-1] == tokenizer.eos_id
        hf.append(tokenizer.decode(ids[:-1] if ended else ids).strip() + ("" if ended else " ..."))
    assert hf == got[:len(SMALL)]


# -- mutations: a broken path must be caught ---------------------------------------------------------

def mutated_accuracy(monkeypatch, mutation: str) -> float:
    """Greedy answers of the fp32 reference model with one deliberate bug, without the engine
    (whose layout checks would refuse a prompt without [IMG_BREAK])."""
    model = load_model(SHIPPED_DIR, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    tokenizer = Tokenizer.for_checkpoint(SHIPPED_DIR)
    if mutation == "swap RoPE-2D row and column":
        build = vision.PackedPatches.from_grids.__func__
        monkeypatch.setattr(vision.PackedPatches, "from_grids", classmethod(
            lambda cls, grids, device: _swapped(build(cls, grids, device))))
    elif mutation == "transpose the patch grid":
        conv = F.conv2d
        monkeypatch.setattr(vision.F, "conv2d", lambda *a, **k: conv(*a, **k).transpose(-1, -2))
    right = 0
    for q in SAMPLE:
        enc = tokenizer.encode(easy_vqa.messages(q))
        tokens = enc.tokens
        if mutation == "drop [IMG_BREAK]":
            tokens = [t for t in tokens if t != IMG_BREAK_ID]
        right += greedy_text(model, tokenizer, tokens, enc.images) == q.answer
    return right / len(SAMPLE)


def _swapped(packed):
    packed.pos = packed.pos[:, [1, 0]].contiguous()
    return packed


@torch.inference_mode()
def greedy_text(model, tokenizer, tokens: list[int], images, max_new_tokens: int = 4) -> str:
    features = model.encode_images([torch.from_numpy(i) for i in images])
    new = []
    for _ in range(max_new_tokens):
        ids = torch.tensor(tokens + new)
        h = model.embed(ids, features)
        meta = AttentionMetadata.for_sequences([len(ids)], "cpu")
        nxt = int(model.logits(model.run_decoder(h, meta)[-1:]).argmax())
        if nxt == tokenizer.eos_id:
            return tokenizer.decode(new).strip()
        new.append(nxt)
    return tokenizer.decode(new).strip() + " ..."


def test_the_unmutated_harness_scores_as_the_engine(monkeypatch):
    assert mutated_accuracy(monkeypatch, "none") >= SHIPPED


INSENSITIVE = pytest.mark.xfail(strict=True, reason="the shipped model tells shapes apart too weakly for the "
                                "patches' layout to change its answers (90% on the sample either way): a model at "
                                "issue 18's bar must see it")


@pytest.mark.parametrize("mutation", [pytest.param("swap RoPE-2D row and column", marks=INSENSITIVE),
                                      "drop [IMG_BREAK]",
                                      pytest.param("transpose the patch grid", marks=INSENSITIVE)])
def test_a_broken_path_answers_worse(monkeypatch, mutation):
    assert mutated_accuracy(monkeypatch, mutation) < SHIPPED
