"""How a tensor-parallel rank's share of the model is cut (Megatron style), as pure arithmetic on
the config: no process group, so the same plan drives loading, the meta-device memory plan and
the tests.

Decoder attention: wq/wk/wv split by heads (column parallel), wo by its input (row parallel, then
an all-reduce). FFN: w1/w3 column parallel, w2 row parallel (then an all-reduce). When the ranks
outnumber the KV heads, each KV head is replicated so that every rank holds the one its query
heads read. Embedding and output: split by vocabulary rows, each rank's share padded to
ceil(vocab / size) rows. The ViT, the adapter, the patch merger and every norm are replicated."""
from __future__ import annotations

from dataclasses import dataclass, replace

from pixtral_fast.config import TextArgs

ColumnRows = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
              "feed_forward.w1.weight", "feed_forward.w3.weight")
RowColumns = ("attention.wo.weight", "feed_forward.w2.weight")
VocabRows = ("tok_embeddings.weight", "output.weight")


def check_size(value) -> int:
    """tensor_parallel_size as an int >= 1, or a ValueError naming it (True is not 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ShardPlan:
    size: int = 1
    rank: int = 0

    def __post_init__(self):
        for name in ("size", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"tensor parallel {name} must be an int, got {value!r}")
        if self.size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.size})")

    @property
    def is_parallel(self) -> bool:
        return self.size > 1

    def check(self, args: TextArgs) -> None:
        """ValueError naming the field when the decoder cannot be split `size` ways."""
        n = self.size
        problems = []
        if args.n_heads % n:
            problems.append(f"n_heads {args.n_heads} is not divisible by it")
        if args.hidden_dim % n:
            problems.append(f"hidden_dim {args.hidden_dim} is not divisible by it")
        kv = args.n_kv_heads
        if (kv % n) if n <= kv else (n % kv):
            problems.append(f"n_kv_heads {kv} neither divides by it nor divides it (KV heads are split, or "
                            "replicated when the ranks outnumber them)")
        if problems:
            raise ValueError(f"tensor_parallel_size={n} cannot split this decoder: " + "; ".join(problems))

    # -- this rank's slices, in units of heads / rows ----------------------------------------------

    def query_heads(self, args: TextArgs) -> tuple[int, int]:
        per = args.n_heads // self.size
        return self.rank * per, per

    def kv_heads(self, args: TextArgs) -> tuple[int, int]:
        """(first KV head, count) this rank holds: its share, or the one KV head its query heads
        read when KV heads are replicated."""
        kv = args.n_kv_heads
        if self.size <= kv:
            per = kv // self.size
            return self.rank * per, per
        return self.rank * kv // self.size, 1

    def hidden(self, args: TextArgs) -> tuple[int, int]:
        per = args.hidden_dim // self.size
        return self.rank * per, per

    def vocab_rows_per_rank(self, vocab: int) -> int:
        return -(-vocab // self.size)

    def vocab(self, vocab: int) -> tuple[int, int]:
        """(first row, rows of real vocabulary) of this rank's share; the share is padded with zero
        rows to vocab_rows_per_rank (the last rank's may hold fewer real rows, or none)."""
        per = self.vocab_rows_per_rank(vocab)
        start = min(self.rank * per, vocab)
        return start, min(per, vocab - start)

    def local_text_args(self, args: TextArgs) -> TextArgs:
        """The decoder this rank builds: its heads, KV heads and FFN width (the vocabulary stays
        whole: the embedding and output modules hold the vocabulary share)."""
        if not self.is_parallel:
            return args
        self.check(args)
        return replace(args, n_heads=args.n_heads // self.size, n_kv_heads=self.kv_heads(args)[1],
                       hidden_dim=args.hidden_dim // self.size)

    def slice_for(self, name: str, args: TextArgs) -> tuple[int, int, int, int] | None:
        """(dim, start, length, padded length) of this rank's cut of the consolidated tensor
        `name`, or None when every rank holds it whole."""
        if not self.is_parallel or name.startswith(("vision_encoder.", "vision_language_adapter.",
                                                    "patch_merger.", "pre_mm_projector_norm.")):
            return None
        if name in VocabRows:
            start, length = self.vocab(args.vocab_size)
            return 0, start, length, self.vocab_rows_per_rank(args.vocab_size)
        if not name.startswith("layers."):
            return None
        hd = args.head_dim
        if name.endswith("attention.wq.weight") or name.endswith("attention.wo.weight"):
            first, count = self.query_heads(args)
            return (0 if name.endswith("wq.weight") else 1), first * hd, count * hd, count * hd
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            first, count = self.kv_heads(args)
            return 0, first * hd, count * hd, count * hd
        if name.endswith(("feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight")):
            first, count = self.hidden(args)
            return (1 if name.endswith("w2.weight") else 0), first, count, count
        return None  # norms
