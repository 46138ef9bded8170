"""`pixtral-fast train-demo`: a small Pixtral (ViT with RoPE-2D, GELU adapter, GQA decoder) trained
from scratch on easy-VQA's training split to answer each question with its answer word and EOS.

Plain PyTorch on our own model classes: the layers run with the reference ops (pixtral_fast.reference),
except that attention over a batch of equal-length sequences is one batched call instead of a
loop. Prompts are what inference builds (pixtral_fast.easy_vqa). Deterministic: fixed seeds and
one thread, so the same command writes the same weights.

Only the vocabulary rows the data uses are trained (a compact table, scattered into the real
131072 rows at save time; the others stay zero, which git stores in almost nothing). A zero
output row still gets logit 0 at inference, so the loss counts the untrained rows exactly: their
softmax mass is (V - n) * exp(0), one constant logit log(V - n) beside the trained ones."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pixtral_fast import reference
from pixtral_fast.config import ModelArgs, TextArgs, VisionArgs
from pixtral_fast.easy_vqa import EncodedSplit, Question, encode, kind_of, questions, sample
from pixtral_fast.model.pixtral import Pixtral
from pixtral_fast.model.text import AttentionMetadata
from pixtral_fast.tiny import write_tokenizer
from pixtral_fast.tokenizer import Tokenizer
from pixtral_fast.weights import save_consolidated

# The ViT as the family builds it for Mistral-Small-3.1: 8-pixel patches (16-pixel ones hold too
# little of a 64x64 shape for a small ViT to learn shapes in minutes), then an RMSNorm and a 2x2
# patch merger, so that the decoder reads 4x4 [IMG] tokens per image, not 8x8. The tokenizer
# file carries the same image section (tiny.write_tokenizer).
DEMO_ARGS = ModelArgs(
    text=TextArgs(dim=128, n_layers=3, head_dim=32, hidden_dim=256, n_heads=4, n_kv_heads=2,
                  rope_theta=1e6, norm_eps=1e-5, vocab_size=131072),
    vision=VisionArgs(hidden_size=128, num_channels=3, image_size=256, patch_size=8, rope_theta=1e4,
                      intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, adapter_bias=False,
                      spatial_merge_size=2, mm_projector_id="patch_merge", add_pre_mm_projector_layer_norm=True,
                      max_image_size=256),
)
SHIPPED_DIR = Path(__file__).resolve().parent / "demo_model"
# How often each kind of question is drawn, relative to a yes/no one: an answer that names a shape
# or a colour is what teaches the ViT to see them.
ANSWER_WEIGHTS = {"shape": 3.0, "colour": 3.0, "yes/no": 1.0}


@dataclass
class TrainConfig:
    epochs: int = 14  # 3,500 steps, ~14 minutes on one core of this machine
    images_per_batch: int = 16
    questions_per_image: int = 3  # drawn anew each epoch from the image's ~10: the ViT learns slowest
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    eval_questions: int = 500  # a test sample scored after each epoch (its words join the vocabulary)
    max_steps: int | None = None  # stop early (tests)
    eval_every: int | None = None  # steps between accuracy reports besides each epoch's end


def batched_attention(q, k, v, cu_seqlens, max_seqlen, scale=None, causal=False, pos=None, rope_theta=1e4,
                      *, validate_indices=True):
    """reference.varlen_attention, as one batched call when every sequence has the same length
    (training pads each batch to one length); the reference's loop otherwise. Same math: RoPE-2D on q
    and k when pos is given, query head h reads KV head h // (H / Hkv)."""
    lengths = cu_seqlens.diff()
    n, length = lengths.numel(), int(lengths[0])
    if n == 0 or not bool((lengths == length).all()):
        return reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, causal, pos, rope_theta)
    if pos is not None:
        q, k = reference.rope_2d(q, k, pos, rope_theta)
    heads, dim = q.shape[1:]

    def batch(x):
        return x.reshape(n, length, x.shape[1], dim).transpose(1, 2).repeat_interleave(heads // x.shape[1], dim=1)

    o = F.scaled_dot_product_attention(batch(q), batch(k), batch(v), is_causal=causal, scale=scale)
    return o.transpose(1, 2).reshape(q.shape)


TRAINING_OPS = types.SimpleNamespace(**{name: getattr(reference, name) for name in dir(reference)
                                        if not name.startswith("_")})
TRAINING_OPS.varlen_attention = batched_attention


class CompactVocab(nn.Module):
    """The input and output rows of the tokens the data uses; `full_tables` scatters them into
    the model's real vocabulary, zeros elsewhere."""

    def __init__(self, inputs: list[int], outputs: list[int], dim: int, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.register_buffer("in_ids", torch.tensor(inputs), persistent=False)
        self.register_buffer("out_ids", torch.tensor(outputs), persistent=False)
        self.in_index = torch.full((vocab,), -1, dtype=torch.long)
        self.in_index[self.in_ids] = torch.arange(len(inputs))
        self.out_index = torch.full((vocab,), -1, dtype=torch.long)
        self.out_index[self.out_ids] = torch.arange(len(outputs))
        self.embedding = nn.Parameter(torch.empty(len(inputs), dim))
        self.output = nn.Parameter(torch.empty(len(outputs), dim))
        self.untrained_logit = math.log(vocab - len(outputs))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding[self.in_index[tokens]]

    def log_probs_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Trained logits plus one column standing for all untrained rows' softmax mass."""
        logits = h @ self.output.T
        return torch.cat([logits, logits.new_full((h.shape[0], 1), self.untrained_logit)], dim=1)

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """The full-vocabulary argmax: an untrained row (logit 0) wins over negative logits."""
        logits = h @ self.output.T
        best = logits.argmax(dim=1)
        return torch.where(logits.max(dim=1).values > 0, self.out_ids[best], -1)

    def full_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.zeros(self.vocab, self.embedding.shape[1])
        out = torch.zeros(self.vocab, self.output.shape[1])
        emb[self.in_ids] = self.embedding.detach()
        out[self.out_ids] = self.output.detach()
        return emb, out


def init_weights(model: nn.Module, generator: torch.Generator) -> None:
    """Norms at one, biases at zero, matrices (the vocabulary rows too) N(0, 1/fan_in). Embeddings
    as small as the rest matter: N(0, 1) rows drown the image features that attention brings to
    the answering position, and the model then learns to answer from the question alone."""
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(math.prod(p.shape[1:])))


class DemoTrainer(nn.Module):
    """Pixtral's vision encoder, adapter and decoder layers with the compact vocabulary."""

    def __init__(self, args: ModelArgs, data: EncodedSplit):
        super().__init__()
        v = args.vision  # the smallest vocabulary that still holds the image tokens: the tables are replaced
        ids = max(v.image_token_id, v.image_break_token_id, v.image_end_token_id) + 1
        small = dataclasses.replace(args, text=dataclasses.replace(args.text, vocab_size=ids))
        self.args = args
        self.pixtral = Pixtral(small, dtype=torch.float32)
        for table in (self.pixtral.tok_embeddings, self.pixtral.output):  # stand-ins: self.vocab replaces them
            table.requires_grad_(False)
        self.pixtral.kernels = TRAINING_OPS
        used_in = sorted({t for p in data.prompts.values() for t in p} | {t for a in data.targets.values() for t in a})
        used_out = sorted({t for a in data.targets.values() for t in a})
        self.vocab = CompactVocab(used_in, used_out, args.text.dim, args.text.vocab_size)
        self.pad_id = used_out[0]

    def hidden(self, seqs: list[list[int]], images: list[torch.Tensor], image_of: list[int]) -> torch.Tensor:
        """Final-norm hidden states [len(seqs) * L, dim] of sequences right-padded to one length L
        (causal attention: padding after a token never reaches it); seqs[i] shows
        images[image_of[i]], whose ViT pass is shared by all its questions."""
        p = self.pixtral
        per_image = p.image_features(images).unflatten(0, (len(images), -1))
        length = max(len(s) for s in seqs)
        tokens = torch.tensor([s + [self.pad_id] * (length - len(s)) for s in seqs])
        h = self.vocab.embed(tokens.flatten())
        is_image = (tokens.flatten() == self.args.vision.image_token_id)[:, None]
        h = h.masked_scatter(is_image, per_image[torch.tensor(image_of)])
        meta = AttentionMetadata.for_sequences([length] * len(seqs), "cpu")
        return p.run_decoder(h, meta)

    def state_dict_for_checkpoint(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach() for k, v in self.pixtral.state_dict().items()}
        state["tok_embeddings.weight"], state["output.weight"] = self.vocab.full_tables()
        return state


def examples(data: EncodedSplit, qs: list[Question]) -> list[tuple[list[int], Path, list[int]]]:
    """(input tokens, image path, targets): the prompt and the answer but its last token (teacher
    forcing); the loss sits on the last len(targets) positions."""
    out = []
    for q in qs:
        target = data.targets[q.answer]
        out.append((data.prompt(q) + target[:-1], q.image_path, target))
    return out


def batches(items: list, images_per_batch: int, rng: random.Random, per_image: int | None = None,
            weights: dict | None = None) -> list[list]:
    """Shuffled batches of `images_per_batch` images with `per_image` of their questions drawn at
    random (all of them when None), each as likely as `weights` says for its target (default 1)."""
    by_image: dict[Path, list] = {}
    for item in items:
        by_image.setdefault(item[1], []).append(item)
    ids = sorted(by_image)
    rng.shuffle(ids)
    chosen = {i: by_image[i] if per_image is None else _draw(by_image[i], per_image, rng, weights or {}) for i in ids}
    return [[item for i in ids[j:j + images_per_batch] for item in chosen[i]]
            for j in range(0, len(ids), images_per_batch)]


def _draw(items: list, n: int, rng: random.Random, weights: dict) -> list:
    """n items without replacement, each with the weight of its target."""
    weight = [weights.get(tuple(target), 1.0) for _, _, target in items]
    keys = [rng.random() ** (1.0 / w) for w in weight]  # Efraimidis-Spirakis: top-n keys
    return [items[j] for j in sorted(range(len(items)), key=lambda j: -keys[j])[:n]]


def _forward(trainer: DemoTrainer, data: EncodedSplit, batch: list):
    """Hidden states at the positions that predict the targets, and the targets."""
    paths = sorted({path for _, path, _ in batch})
    images = [torch.from_numpy(data.pixels[p]) for p in paths]
    where = {path: j for j, path in enumerate(paths)}
    seqs = [seq for seq, _, _ in batch]
    h = trainer.hidden(seqs, images, [where[path] for _, path, _ in batch])
    length = max(len(s) for s in seqs)
    rows, labels = [], []
    for i, (seq, _, target) in enumerate(batch):
        first = i * length + len(seq) - len(target)
        rows += range(first, first + len(target))
        labels += target
    return h[torch.tensor(rows)], torch.tensor(labels)


def accuracy(trainer: DemoTrainer, data: EncodedSplit, qs: list[Question], images_per_batch: int = 32) -> float:
    """Exact-match answers under greedy decoding, by teacher forcing: greedy decoding writes the
    answer and EOS exactly when every step's argmax is the next target token."""
    items = examples(data, qs)
    correct = 0
    with torch.no_grad():
        for batch in batches(items, images_per_batch, random.Random(0)):
            h, labels = _forward(trainer, data, batch)
            hit = (trainer.vocab.greedy(h) == labels).tolist()
            at = 0
            for _, _, target in batch:
                correct += all(hit[at:at + len(target)])
                at += len(target)
    return correct / max(1, len(items))


def train(out: str | Path, config: TrainConfig = TrainConfig(), args: ModelArgs = DEMO_ARGS,
          progress: bool = True) -> dict:
    """Trains, writes the checkpoint (params.json, consolidated.safetensors, tekken.json,
    training.json) to `out`, and returns the training record."""
    torch.set_num_threads(1)
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, args)  # first: the prompts are the ones this model's tokenizer writes
    tokenizer = Tokenizer.for_checkpoint(out)
    tokenizer.check_matches(args.vision)
    train_qs, eval_qs = questions("train"), sample("test", config.eval_questions, seed=config.seed + 1)
    data = encode(train_qs + eval_qs, tokenizer, progress=progress)
    trainer = DemoTrainer(args, data)
    generator = torch.Generator().manual_seed(config.seed)
    init_weights(trainer, generator)
    rng = random.Random(config.seed)
    items = examples(data, train_qs)
    weights = {tuple(t): ANSWER_WEIGHTS.get(kind_of(a), 1.0) for a, t in data.targets.items()}
    steps_per_epoch = len(batches(items, config.images_per_batch, random.Random(0)))
    total = steps_per_epoch * config.epochs if config.max_steps is None else config.max_steps
    decay = [p for n, p in trainer.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in trainer.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / config.warmup_steps)
                                                 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    record = {"config": config.__dict__, "epochs": []}
    step = 0
    bar = tqdm(total=total, desc="train", disable=not progress)
    for epoch in range(config.epochs):
        losses = []
        for batch in batches(items, config.images_per_batch, rng, config.questions_per_image, weights):
            if step == total:
                break
            h, labels = _forward(trainer, data, batch)
            loss = F.cross_entropy(trainer.vocab.log_probs_logits(h), trainer.vocab.out_index[labels])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            if config.eval_every and step % config.eval_every == 0:
                tqdm.write(f"step {step}: accuracy on {len(eval_qs)} test questions "
                           f"{accuracy(trainer, data, eval_qs):.2%}")
            bar.set_postfix(epoch=epoch + 1, loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        acc = accuracy(trainer, data, eval_qs)
        record["epochs"].append({"epoch": epoch + 1, "steps": step, "loss": sum(losses) / max(1, len(losses)),
                                 "test_sample_accuracy": acc})
        tqdm.write(f"epoch {epoch + 1}: loss {record['epochs'][-1]['loss']:.4f}, accuracy on "
                   f"{len(eval_qs)} test questions {acc:.2%}")
        if step == total:
            break
    bar.close()
    record["seconds"] = round(time.perf_counter() - t0, 1)
    save_consolidated(trainer.state_dict_for_checkpoint(), args, out)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
