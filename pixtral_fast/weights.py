"""Checkpoint I/O: Mistral's consolidated.safetensors and HF Llava/Pixtral folders.

Every key, shape and dtype is checked against the tensor table of the config (config_tensors)
before a byte of tensor data is read; one CheckpointError lists everything that is missing,
unexpected, mis-shaped or not floating point. The header reader, the HF name map, the tensor
reader and the dense tensors' loop (read_dense, tie_output) serve the packed (compressed-tensors)
loader too: packed_weights.py.
Each file's header is read once (safetensors checks it, then its JSON gives every tensor's byte
range); the file is memory-mapped and each tensor (or a tensor-parallel rank's cut of it) is a
view of its bytes, converted to the target dtype and placed on the target device one at a time,
so a 25 GB checkpoint never sits twice in host memory and loads as fast as
safetensors.torch.load_file reads it.
"""
from __future__ import annotations

import json
import math
import mmap
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pixtral_fast.config import CheckpointError, ModelArgs, read_json
from pixtral_fast.config_hf import ties_word_embeddings
from pixtral_fast.config_tensors import tensor_shapes
from pixtral_fast.parallel.plan import ShardPlan

CONSOLIDATED = "consolidated.safetensors"


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """{consolidated name: shape} of every tensor a checkpoint of `args` holds (config_tensors)."""
    return tensor_shapes(args)


def open_safetensors(f: Path):
    """safe_open(f) on the CPU for torch, which reads and checks the header (safetensors refuses a
    file its header does not cover: truncated or empty); a file it cannot read is a
    CheckpointError naming it, not safetensors' own error."""
    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable(f, e) from None


def unreadable(f: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{f}: not a readable safetensors file (truncated or corrupt?): {e}")


# safetensors dtype names of floating-point tensors the loader converts exactly to bf16/fp16/fp32.
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
# Every safetensors dtype a checkpoint of ours holds: the dense weights' floats, and what
# compressed-tensors stores (I32 packed int4 words, F8_E4M3 bytes, I64 weight_shape).
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorRecord:
    """One tensor as its file's header describes it; begin/end are byte offsets in the file."""
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype of its bytes; None for a dtype no checkpoint of ours holds."""
        return TORCH_DTYPES.get(self.dtype)


def read_header(f: Path) -> dict[str, TensorRecord]:
    """name -> TensorRecord of every tensor in `f`, without reading tensor data. safetensors checks
    the header first (offsets inside the file, no gap or overlap, each byte range the size its
    shape and dtype say), so the JSON read here describes the file exactly."""
    with open_safetensors(f):
        pass
    try:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise unreadable(f, e) from None
    data = 8 + size
    return {name: TensorRecord(f, entry["dtype"], tuple(entry["shape"]), data + entry["data_offsets"][0],
                               data + entry["data_offsets"][1])
            for name, entry in header.items() if name != "__metadata__"}


def read_records(files: Iterable[Path]) -> dict[str, TensorRecord]:
    """The headers of every file in one table, of any dtype: what each tensor may be is the
    consumer's check (check_floating for dense weights; the packed loader's for its layers)."""
    found: dict[str, TensorRecord] = {}
    for f in files:
        for name, record in read_header(f).items():
            if name in found:
                raise CheckpointError(f"{name} appears in both {found[name].file} and {f}")
            found[name] = record
    return found


def check_floating(records: dict[str, TensorRecord]) -> None:
    """Every dense weight is floating point: integer, bool or fp8 tensors (a quantized or corrupt
    file) are refused, all named in one CheckpointError, instead of being cast into nonsense."""
    wrong_dtype = [f"{name} ({r.dtype})" for name, r in records.items() if r.dtype not in FLOAT_DTYPES]
    if wrong_dtype:
        raise CheckpointError(f"{len(wrong_dtype)} tensor(s) of a non-floating dtype where floating-point weights "
                              f"belong (expected one of {', '.join(FLOAT_DTYPES)}): " + listed(wrong_dtype))


def listed(items: list[str], limit: int = 20) -> str:
    """The first `limit` items, comma-separated, and how many more: an error stays readable."""
    return ", ".join(items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else []))


def check_keys(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], source: str) -> None:
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    misshaped = sorted(f"{k}: file {found[k]} vs model {expected[k]}"
                       for k in expected.keys() & found.keys() if tuple(found[k]) != tuple(expected[k]))
    if missing or unexpected or misshaped:
        parts = [f"{source} does not match its config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + listed(items))
        raise CheckpointError("\n".join(parts))


def check_tokenizer_vocab(vocab_size: int, tokenizer_words: int, source: str = "the checkpoint") -> None:
    """CheckpointError unless the model has an embedding row for every id its tokenizer produces.
    A smaller vocabulary would load and then fail every request whose prompt holds a token past
    its last row; a larger one (rows padded past the tokenizer's last id) is fine."""
    if vocab_size < tokenizer_words:
        raise CheckpointError(f"{source}: the model's vocabulary (vocab_size {vocab_size}) is smaller than its "
                              f"tokenizer's ({tokenizer_words} tokens): the two do not belong together")


# -- HF Llava/Pixtral -------------------------------------------------------------------------------

HF_PREFIXES = [  # transformers >= 4.52 saves the first forms; older releases the second
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
]
_HF_RULES = [(re.compile(p), r) for p, r in [
    (r"^language_model\.model\.embed_tokens\.", "tok_embeddings."),
    (r"^language_model\.model\.norm\.", "norm."),
    (r"^language_model\.lm_head\.", "output."),
    (r"^language_model\.model\.layers\.(\d+)\.", r"layers.\1."),
    (r"^vision_tower\.", "vision_encoder."),
    (r"^multi_modal_projector\.linear_1\.", "vision_language_adapter.w_in."),
    (r"^multi_modal_projector\.linear_2\.", "vision_language_adapter.w_out."),
    (r"^multi_modal_projector\.patch_merger\.", "patch_merger."),   # Mistral3 (Small 3.1/3.2)
    (r"^multi_modal_projector\.norm\.", "pre_mm_projector_norm."),
    (r"\.self_attn\.", ".attention."),
    (r"\.attention\.([qkvo])_proj\.", r".attention.w\1."),
    (r"\.input_layernorm\.", ".attention_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(mlp|feed_forward)\.gate_proj\.", ".feed_forward.w1."),
    (r"\.(mlp|feed_forward)\.up_proj\.", ".feed_forward.w3."),
    (r"\.(mlp|feed_forward)\.down_proj\.", ".feed_forward.w2."),
]]


def hf_spellings(hf_module: str) -> list[str]:
    """An HF module name in both spellings (transformers >= 4.52 and older): `hf_module` first."""
    names = [hf_module]
    for new, old in HF_PREFIXES:
        for a, b in ((new, old), (old, new)):
            if (hf_module + ".").startswith(a):
                names.append((b + (hf_module + ".")[len(a):])[:-1])
    return names


def hf_to_consolidated_name(name: str) -> str:
    for new, old in HF_PREFIXES:
        if name.startswith(new):
            name = old + name[len(new):]
            break
    for pattern, repl in _HF_RULES:
        name = pattern.sub(repl, name)
    return name


def by_consolidated_name(hf_names: Iterable[str], folder: Path) -> dict[str, str]:
    """{consolidated name: HF name}. Two tensors that name one weight (both lm_head.weight and
    language_model.lm_head.weight, say) are a CheckpointError naming them: neither is dropped."""
    names: dict[str, str] = {}
    twice = []
    for name in hf_names:
        new = hf_to_consolidated_name(name)
        if new in names:
            twice.append(f"{names[new]} / {name}")
        names.setdefault(new, name)
    if twice:
        raise CheckpointError(f"{folder}: tensors that name the same weight: {', '.join(twice[:20])}")
    return names


def undo_hf_rope_permutation(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores wq/wk rows ordered for rotate-half RoPE; back to interleaved pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def apply_hf_rope_permutation(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse: interleaved pairs -> HF's rotate-half row order."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_heads(name: str, args: ModelArgs) -> int | None:
    """How many heads the HF rotate-half permutation of the weight `name` (consolidated) runs
    over: wq/wk of the decoder and the ViT; None for every other tensor."""
    if name.endswith(("attention.wq.weight", "attention.wk.weight")):
        kv = name.endswith("wk.weight")
        if name.startswith("vision_encoder."):
            return args.vision.num_attention_heads
        return args.text.n_kv_heads if kv else args.text.n_heads
    return None


def rope_heads_read(name: str, args: ModelArgs, cut: tuple[int, int, int, int] | None) -> int | None:
    """rope_heads of the rows read: HF's permutation runs within each head, so a rank's row cut of
    wq/wk (whole heads) is un-permuted over the heads it holds."""
    heads = rope_heads(name, args)
    if heads is None or cut is None or cut[0] != 0:
        return heads
    return cut[2] // args.text.head_dim


def hf_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            shards = sorted(set(weight_map.values()))
            if not all(isinstance(s, str) and s and "/" not in s and s not in (".", "..") for s in shards):
                raise ValueError(f"shard names must be plain file names, got {shards[:5]}")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {str(e)[:200]})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not there: {missing}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no model*.safetensors files (HF format) and no {CONSOLIDATED}")
    return files


# -- loading ----------------------------------------------------------------------------------------

def load_state_dict(folder: str | Path, args: ModelArgs, device, dtype: torch.dtype,
                    progress: bool = True, shard: ShardPlan | None = None) -> dict[str, torch.Tensor]:
    """Reads a consolidated or HF folder into consolidated names, checked against `args`. With a
    tensor-parallel `shard`, only that rank's slice of each split tensor is read (a slice of the
    memory-mapped file), so a rank's host memory holds its share, not the whole model. An HF
    folder whose config ties the output head to the embedding and holds no lm_head gets the
    embedding as output.weight (one tensor, both names). Every tensor returned is contiguous."""
    folder = Path(folder)
    hf = not (folder / CONSOLIDATED).is_file()
    records = read_records(hf_files(folder) if hf else [folder / CONSOLIDATED])
    check_floating(records)
    source = by_consolidated_name(records, folder) if hf else {k: k for k in records}
    tied = hf and tie_output(source, folder)
    check_keys({new: records[old].shape for new, old in source.items()}, expected_shapes(args), str(folder))
    mapped = {f: map_file(f) for f in {r.file for r in records.values()}}
    with tqdm(total=len(source), desc="loading weights", unit="tensor", disable=not progress) as bar:
        return read_dense(records, source, mapped, args, hf, shard, device, dtype, bar, tied)


def tie_output(source: dict[str, str], folder: Path) -> bool:
    """Whether an HF folder's output head is its embedding: its config ties them and `source`
    ({consolidated name: stored name}) holds no output.weight, which then names the embedding's
    stored tensor too."""
    tied = "output.weight" not in source and "tok_embeddings.weight" in source and hf_tied_output(folder)
    if tied:
        source["output.weight"] = source["tok_embeddings.weight"]
    return tied


def read_dense(records: dict[str, TensorRecord], source: dict[str, str], mapped: dict[Path, mmap.mmap],
               args: ModelArgs, hf: bool, shard: ShardPlan | None, device, dtype: torch.dtype, bar,
               tied: bool = False) -> dict[str, torch.Tensor]:
    """The dense tensors `source` names ({consolidated name: stored name}), each file read front
    to back, each (or this rank's cut of it) as the model holds it (placed). Tied: the output head
    is the embedding's tensor, its rows cut the same way (plan.VocabRows), held once."""
    in_file_order = sorted((new for new in source if not (tied and new == "output.weight")),
                           key=lambda new: (str(records[source[new]].file), records[source[new]].begin))
    state: dict[str, torch.Tensor] = {}
    for new in in_file_order:
        record = records[source[new]]
        cut = None if shard is None else shard.slice_for(new, args.text)
        state[new] = placed(read_tensor(mapped[record.file], record, cut), new, args, hf, cut, device, dtype)
        bar.update()
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
        bar.update()
    return state


def hf_tied_output(folder: Path) -> bool:
    """Whether the folder's config.json ties the output head to the embedding (transformers' rule)."""
    config = folder / "config.json"
    return config.is_file() and ties_word_embeddings(read_json(config, "config.json")[1])


def map_file(f: Path) -> mmap.mmap:
    """`f` mapped copy-on-write: tensors read from it are views, and writing one never touches the file."""
    try:
        with open(f, "rb") as fh:
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:
        raise unreadable(f, e) from None


def read_tensor(mapped: mmap.mmap, record: TensorRecord, cut: tuple[int, int, int, int] | None) -> torch.Tensor:
    """The tensor of `record`, or the (dim, start, length) cut of it, as a view of the mapped file:
    a row cut maps only its own byte range; a column cut (wo, w2) is a strided view whose copy
    (placed) reads only this rank's columns."""
    dtype = record.torch_dtype
    if dtype is None:
        raise CheckpointError(f"{record.file}: a tensor of dtype {record.dtype}, which no checkpoint of this model "
                              f"holds (one of {', '.join(TORCH_DTYPES)})")
    begin, end, shape = record.begin, record.end, record.shape
    if cut is not None and cut[0] == 0:
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        begin, end = begin + cut[1] * row_bytes, begin + (cut[1] + cut[2]) * row_bytes
        shape = (cut[2], *shape[1:])
    t = _bytes_as(mapped, dtype, begin, end).view(shape)
    return t if cut is None or cut[0] == 0 else t[:, cut[1]:cut[1] + cut[2]]


def _bytes_as(mapped: mmap.mmap, dtype: torch.dtype, begin: int, end: int) -> torch.Tensor:
    if end == begin:  # frombuffer refuses an empty range
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin)


def placed(t: torch.Tensor, name: str, args: ModelArgs, hf: bool, cut: tuple[int, int, int, int] | None,
           device, dtype: torch.dtype) -> torch.Tensor:
    """A tensor as read -> as the model holds it: HF's q/k rows un-permuted, a vocabulary share
    padded, converted, on `device`, contiguous."""
    heads = rope_heads_read(name, args, cut) if hf else None
    if heads is not None:
        t = undo_hf_rope_permutation(t, heads)
    if cut is not None and cut[3] > cut[2]:  # a vocabulary share padded to the equal size
        t = torch.cat([t, t.new_zeros(cut[3] - cut[2], *t.shape[1:])])
    # A column cut is a strided view of whole rows (the kernels refuse it): .contiguous() copies
    # only this rank's share.
    return t.to(device=device, dtype=dtype).contiguous()


def save_consolidated(state: dict[str, torch.Tensor], args: ModelArgs, folder: str | Path,
                      dtype: torch.dtype = torch.bfloat16) -> Path:
    """Writes params.json + consolidated.safetensors (the tokenizer file is the caller's)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    check_keys({k: tuple(v.shape) for k, v in state.items()}, expected_shapes(args), "state dict")
    tensors, storages = {}, set()
    for k, v in state.items():
        t = v.detach().to(device="cpu", dtype=dtype).contiguous()
        if t.untyped_storage().data_ptr() in storages:  # rows of one fused weight: safetensors wants
            t = t.clone()                               # each tensor in storage of its own
        storages.add(t.untyped_storage().data_ptr())
        tensors[k] = t
    save_file(tensors, str(folder / CONSOLIDATED), metadata={"format": "pt"})
    (folder / "params.json").write_text(json.dumps(args.to_params_json(), indent=4) + "\n")
    return folder


def convert_hf_to_consolidated(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """An HF Llava/Pixtral folder -> Mistral's consolidated format (wq/wk un-permuted)."""
    args = ModelArgs.from_hf_config(src)
    state = load_state_dict(src, args, "cpu", dtype, progress=False)
    return save_consolidated(state, args, dst, dtype)
