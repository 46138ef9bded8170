"""The easy-VQA data set (the `easy-vqa` package: 64x64 PNGs of one coloured shape, questions with
one-word answers) as prompts exactly as a user sends them: one user message whose content is the
image (an OpenAI `image_url` part) and then the question (a `text` part), tokenized and
preprocessed by the same Tokenizer that inference uses. The answer is the word, then EOS."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pixtral_fast.tokenizer import Tokenizer

SPLITS = ("train", "test")
SAMPLE_SEED = 2409  # the fixed test sample of `make demo` and of the accuracy tests


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    image_id: int
    image_path: Path


def _package():
    try:
        import easy_vqa
    except ImportError:
        raise ImportError("the easy-VQA data set is the `easy-vqa` package: pip install easy-vqa") from None
    return easy_vqa


def questions(split: str) -> list[Question]:
    """Every question of a split, in the package's order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data = _package()
    texts, answers, ids = data.get_train_questions() if split == "train" else data.get_test_questions()
    paths = data.get_train_image_paths() if split == "train" else data.get_test_image_paths()
    return [Question(t, a, i, Path(paths[i])) for t, a, i in zip(texts, answers, ids)]


def answers() -> list[str]:
    return list(_package().get_answers())


def sample(split: str = "test", n: int = 200, seed: int = SAMPLE_SEED) -> list[Question]:
    """A fixed random sample of n questions (all of them when n >= the split's size)."""
    qs = questions(split)
    if n >= len(qs):
        return qs
    return random.Random(seed).sample(qs, n)


def messages(q: Question, image_url: str | None = None) -> list[dict]:
    """The chat a user sends: the image first (a path unless a URL is given), then the question."""
    url = image_url if image_url is not None else str(q.image_path)
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": q.text}]}]


SHAPES = ("circle", "rectangle", "triangle")


def kind_of(answer: str) -> str:
    """'yes/no', 'shape' or 'colour': what a question asks, told by its answer."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "colour"


def answer_tokens(tokenizer: Tokenizer, answer: str) -> list[int]:
    """What the model must generate: the answer word as the tokenizer writes it, then EOS."""
    return tokenizer.tekken.encode(answer, bos=False, eos=False) + [tokenizer.eos_id]


@dataclass
class EncodedSplit:
    """A split tokenized once: prompts per distinct question text (every image is 64x64, so the
    [IMG] block is the same for all), pixels per image, targets per answer."""
    questions: list[Question]
    prompts: dict[str, list[int]]
    pixels: dict[Path, np.ndarray]  # by path: the splits' image ids overlap
    targets: dict[str, list[int]]

    def prompt(self, q: Question) -> list[int]:
        return self.prompts[q.text]


def encode(qs: list[Question], tokenizer: Tokenizer, progress: bool = True) -> EncodedSplit:
    """Prompts and pixels through Tokenizer.encode (mistral_common's chat template and image
    preprocessing), each image and each question text once."""
    first: dict[Path, Question] = {}
    for q in qs:
        first.setdefault(q.image_path, q)
    pixels, image_tokens = {}, None
    for path, q in tqdm(first.items(), desc="preprocess images", disable=not progress, leave=False):
        enc = tokenizer.encode(messages(q))
        pixels[path] = enc.images[0]
        block = _image_block(enc.tokens, tokenizer)
        if image_tokens is None:
            image_tokens = block
        elif block != image_tokens:  # would make prompts image dependent: easy-VQA's images are all 64x64
            raise ValueError(f"{q.image_path}: its [IMG] block differs from the first image's")
    prompts = {}
    for q in qs:
        if q.text not in prompts:
            prompts[q.text] = tokenizer.encode(messages(q)).tokens
    targets = {a: answer_tokens(tokenizer, a) for a in sorted({q.answer for q in qs})}
    return EncodedSplit(list(qs), prompts, pixels, targets)


def _image_block(tokens: list[int], tokenizer: Tokenizer) -> list[int]:
    ids = tokenizer.mistral.instruct_tokenizer.image_encoder.special_ids
    marks = [i for i, t in enumerate(tokens) if t in (ids.img, ids.img_break, ids.img_end)]
    return tokens[marks[0]:marks[-1] + 1]


@dataclass
class Evaluation:
    questions: list[Question]
    answers: list[str]   # the text; an answer not ended by EOS carries a trailing " ..."

    @property
    def correct(self) -> int:
        return sum(a == q.answer for q, a in zip(self.questions, self.answers))

    def __str__(self) -> str:
        return f"{self.correct}/{len(self.questions)} = {self.accuracy:.2%}"

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, len(self.questions))


def evaluate(engine, qs: list[Question], batch_size: int = 64, progress: bool = False) -> Evaluation:
    """Greedy answers of an Engine (or anything with its generate(batch) and tokenizer) to the
    questions, batch_size requests at a time; an answer is the completion's text, stripped, and
    counts only when the model ended it (EOS) within the longest answer's length."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_tokens = max(len(answer_tokens(engine.tokenizer, a)) for a in answers())
    out: list[str] = []
    for start in tqdm(range(0, len(qs), batch_size), desc="answer", disable=not progress, leave=False):
        chunk = qs[start:start + batch_size]
        completions = engine.generate([messages(q) for q in chunk], max_new_tokens=max_tokens)
        for q, c in zip(chunk, completions):
            if c.finish_reason == "error":
                raise RuntimeError(f"{q.image_path}, {q.text!r}: {c.error}")
            out.append(c.text.strip() + ("" if c.finish_reason == "stop" else " ..."))
    return Evaluation(list(qs), out)
