"""Loading an HF folder in the compressed-tensors format (config.json with quantization_config)
into a Pixtral whose quantized linears stay packed: each file tensor is read once, moved to the
device as it is stored (int32 packed words, e4m3 bytes, scales in their stored dtype), and the
module is swapped for a QuantLinear (quant/linear.py) before load_state_dict. Nothing is
dequantized. The headers, the HF names and the bytes are read as the dense loader reads them
(pixtral_fast.weights: read_records, hf_spellings, read_tensor on the mapped file), and the
dense tensors by the dense loader's own read_dense: a rank's cuts, HF's q/k row order and an
output head tied to the embedding (tie_output) alike.

Which layers are quantized is read from the file (a module with `weight_packed`, or an e4m3
`weight`), and must agree with the config's targets/ignore (scheme_for); the config gives the
group size and the activation scheme. HF's rotate-half row order of wq/wk is undone on the packed
rows and their scales alike (quantization is per row, so rows permute with their scales).

A tensor-parallel rank reads only its share of each tensor (a view of the mapped file): the rows
of a column-parallel layer's packed words, e4m3 bytes and per-row scales; the input columns of a
row-parallel one (wo, w2), where a W4A16 cut must fall on a pack boundary (8 int4 per int32)
and on a scale-group boundary, or the checkpoint is refused naming the layer.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from pixtral_fast.parallel.plan import ShardPlan, VocabRows
from pixtral_fast.quant.config import QuantConfig, WeightScheme
from pixtral_fast.quant.formats import FP8_DTYPE, INT4_PER_WORD, packed_words
from pixtral_fast.weights import (CheckpointError, TensorRecord, by_consolidated_name, check_floating, check_keys,
                                  expected_shapes, hf_files, hf_spellings, hf_to_consolidated_name, listed, map_file,
                                  read_dense, read_records, read_tensor, rope_heads_read, tie_output,
                                  undo_hf_rope_permutation)

Cut = tuple[int, int, int, int]  # (dim, start, length, padded length), as ShardPlan.slice_for gives it

# What each format stores under a quantized layer, and nothing else.
_KIND_SUFFIXES = {"w4a16": ("weight_packed", "weight_scale", "weight_shape"), "fp8": ("weight", "weight_scale")}
_REFUSED_SUFFIXES = {"weight_zero_point": "an asymmetric zero point", "weight_g_idx": "act-order (g_idx)",
                     "input_scale": "static activation scales", "weight_global_scale": "a global scale"}


def _scheme(qconfig: QuantConfig, hf_module: str, classes: tuple[str, ...]) -> WeightScheme | None:
    """Ignored under either spelling means ignored (compressed-tensors writes the spelling of the
    model it quantized; the file may hold the other)."""
    names = hf_spellings(hf_module)
    if any(qconfig.ignored(name, classes) for name in names):
        return None
    for name in names:
        scheme = qconfig.scheme_for(name, classes)
        if scheme is not None:
            return scheme
    return None


def _classes(model, cons_module: str) -> tuple[str, ...]:
    """Class names along the MRO of our module of that name ('Linear' for every nn.Linear), as
    compressed-tensors matches class targets; () for a name the model does not have."""
    try:
        module = model.get_submodule(cons_module)
    except AttributeError:
        return ()
    return tuple(c.__name__ for c in type(module).__mro__)


def read_quantized_state(folder: str | Path, args, qconfig: QuantConfig, model, device, dtype: torch.dtype,
                         progress: bool = True, shard: ShardPlan | None = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, WeightScheme]]:
    """(state dict in consolidated names, {consolidated module name: scheme} of the quantized ones).
    model: the dense model (on the meta device) whose module types the class targets match.
    shard: a tensor-parallel rank's plan: only its share of each split tensor is read."""
    folder = Path(folder)
    records = read_records(hf_files(folder))
    quantized = _quantized_layers(folder, records, qconfig, model)

    expected = expected_shapes(args)
    q_modules = {m for m, _ in quantized.values()}
    dense = by_consolidated_name((k for k in records if k.rpartition(".")[0] not in q_modules), folder)
    tied = "output" not in quantized and tie_output(dense, folder)
    check_floating({k: records[k] for k in dense.values()})
    check_keys({c: records[k].shape for c, k in dense.items()},
               {c: s for c, s in expected.items() if c.rsplit(".", 1)[0] not in quantized}, str(folder))

    shard = shard if shard is not None and shard.is_parallel else None
    mapped = {f: map_file(f) for f in {r.file for r in records.values()}}
    with tqdm(total=len(dense) + len(quantized), desc="loading weights", unit="tensor", disable=not progress) as bar:
        state = read_dense(records, dense, mapped, args, True, shard, device, dtype, bar, tied)
        _read_quantized(folder, args, records, mapped, quantized, expected, device, state, bar, shard)
    return state, {cons: scheme for cons, (_, scheme) in quantized.items()}


def _quantized_layers(folder: Path, tensors: dict[str, TensorRecord], qconfig: QuantConfig,
                      model) -> dict[str, tuple[str, WeightScheme]]:
    """{consolidated module: (HF module, scheme)} of the layers the file holds quantized, checked
    against the config's targets and ignore list and against what each format stores."""
    for key in tensors:
        suffix = key.rsplit(".", 1)[-1]
        if suffix in _REFUSED_SUFFIXES:
            raise CheckpointError(f"{folder}: tensor {key} holds {_REFUSED_SUFFIXES[suffix]}: not supported")
    quantized: dict[str, tuple[str, WeightScheme]] = {}  # consolidated module -> (hf module, scheme)
    for key, record in tensors.items():
        module, _, suffix = key.rpartition(".")
        fp8 = suffix == "weight" and record.torch_dtype == FP8_DTYPE
        kind = "w4a16" if suffix == "weight_packed" else "fp8" if fp8 else None
        cons = hf_to_consolidated_name(module + ".weight")[: -len(".weight")]
        scheme = _scheme(qconfig, module, _classes(model, cons))
        if kind is None:
            if suffix == "weight" and scheme is not None and len(record.shape) == 2:
                raise CheckpointError(f"{folder}: quantization_config targets {module} ({scheme.kind}) but the "
                                      f"file holds a dense {record.torch_dtype} weight for it")
            continue
        if scheme is None or scheme.kind != kind:
            raise CheckpointError(f"{folder}: {key} is {kind} but quantization_config gives {module} "
                                  f"{'no scheme' if scheme is None else scheme.kind} (targets / ignore)")
        quantized[cons] = (module, scheme)
    _check_quantized_keys(folder, tensors, quantized)
    return quantized


def check_split(folder: str | Path, args, qconfig: QuantConfig, model, size: int) -> None:
    """CheckpointError where some rank of a `size`-way split cannot take its share of a quantized
    layer (quantized_cuts), from the headers alone: found before any rank starts loading."""
    folder = Path(folder)
    quantized = _quantized_layers(folder, read_records(hf_files(folder)), qconfig, model)
    expected = expected_shapes(args)
    for rank in range(size):
        plan = ShardPlan(size, rank)
        for cons, (module, scheme) in quantized.items():
            if cons + ".weight" in expected:  # (a layer the model lacks is the loader's error to name)
                quantized_cuts(folder, module, scheme, layer_cut(folder, module, cons, args, plan),
                               expected[cons + ".weight"][1], plan)


def _check_quantized_keys(folder: Path, tensors: dict[str, TensorRecord],
                          quantized: dict[str, tuple[str, WeightScheme]]) -> None:
    """Every tensor under a quantized layer is one its format stores, as the dense loader takes no
    tensor the model does not have: a bias (the quantized kernels add none) or anything else there
    is refused by name, never dropped."""
    kinds = {module: scheme.kind for module, scheme in quantized.values()}
    biases, unexpected = [], []
    for key in tensors:
        module, _, suffix = key.rpartition(".")
        kind = kinds.get(module)
        if kind is not None and suffix not in _KIND_SUFFIXES[kind]:
            (biases if suffix == "bias" else unexpected).append(f"{key} ({kind})")
    if biases:
        raise CheckpointError(f"{folder}: quantized layers with a bias are not supported (keep the layer dense: list "
                              f"it in quantization_config.ignore): {listed(biases)}")
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensors under quantized layers (W4A16 stores "
                              f"{', '.join(_KIND_SUFFIXES['w4a16'])}; FP8 {', '.join(_KIND_SUFFIXES['fp8'])}): "
                              f"{listed(unexpected)}")


def _read_quantized(folder, args, records, mapped, quantized, expected, device, state, bar, shard) -> None:
    """Each quantized layer's stored tensors (or this rank's cuts of them) into `state` as stored."""
    for cons, (module, scheme) in quantized.items():
        n, k = expected.get(cons + ".weight", (None, None))
        if n is None:
            raise CheckpointError(f"{folder}: {module} is not a weight of this model ({cons})")
        stored = {s: records[f"{module}.{s}"] for s in _KIND_SUFFIXES[scheme.kind] if f"{module}.{s}" in records}
        shape_value = (read_tensor(mapped[stored["weight_shape"].file], stored["weight_shape"], None)
                       if "weight_shape" in stored else None)
        _check_quantized(folder, module, scheme, {s: (r.torch_dtype, r.shape) for s, r in stored.items()},
                         shape_value, n, k)
        cut = layer_cut(folder, module, cons, args, shard)
        cuts = quantized_cuts(folder, module, scheme, cut, k, shard)
        heads = rope_heads_read(cons + ".weight", args, cut)
        rows = n if cut is None or cut[0] != 0 else cut[2]
        for s, record in stored.items():
            if s == "weight_shape":
                continue
            t = read_tensor(mapped[record.file], record, cuts[s])
            if heads and t.dim() == 2 and t.shape[0] == rows:  # rows of wq/wk: packed, e4m3 or per-row scales
                t = undo_hf_rope_permutation(t, heads)
            state[f"{cons}.{s}"] = t.contiguous().to(device)
        bar.update()


def layer_cut(folder, module: str, cons: str, args, shard: ShardPlan | None) -> Cut | None:
    """This rank's cut of the quantized layer `cons` (consolidated name), or None where it holds
    it whole. The vocabulary-parallel output head gathers its rows itself and has no quantized
    form: a quantized one is refused at tensor_parallel_size > 1."""
    if shard is None or not shard.is_parallel:
        return None
    if cons + ".weight" in VocabRows:
        raise CheckpointError(f"{folder}: {module} is quantized but tensor parallelism splits it by vocabulary rows: "
                              f"only the decoder's linears can be quantized at tensor_parallel_size {shard.size} "
                              "(keep this layer dense: quantization_config.ignore)")
    return shard.slice_for(cons + ".weight", args.text)


def quantized_cuts(folder, module: str, scheme: WeightScheme, cut: Cut | None, k: int,
                   shard: ShardPlan | None) -> dict[str, Cut | None]:
    """Each stored tensor's cut for the layer cut `cut` of its dense weight [n, k]: rows cut the
    packed words, e4m3 bytes and per-row scales alike (a per-tensor scale stays whole); input
    columns cut W4A16's packed words in words and its scales in groups (a per-channel scale, one
    per row, stays whole), FP8's bytes as they are. A W4A16 column cut off a pack or group
    boundary is a CheckpointError."""
    whole = {s: None for s in _KIND_SUFFIXES[scheme.kind]}
    if cut is None:
        return whole
    dim, start, length, _ = cut
    if dim == 0:
        per_row_scale = scheme.kind == "w4a16" or scheme.strategy == "channel"
        return whole | {"weight_packed" if scheme.kind == "w4a16" else "weight": cut,
                        "weight_scale": cut if per_row_scale else None}
    if scheme.kind == "fp8":
        return whole | {"weight": cut}
    group = scheme.group_size_for(k)
    per_row_scale = group == k
    step = INT4_PER_WORD if per_row_scale else math.lcm(group, INT4_PER_WORD)
    if start % step or length % step:
        raise CheckpointError(
            f"{folder}: {module} (W4A16, group_size {group}) cannot be split by tensor_parallel_size {shard.size}: "
            f"each rank takes {length} of its {k} input columns, which must be a multiple of the group size and of "
            f"the {INT4_PER_WORD} int4 values packed in one int32 word (quantize with a group size that divides "
            f"{length}, or lower the tensor parallel size)")
    packed = (1, start // INT4_PER_WORD, length // INT4_PER_WORD, length // INT4_PER_WORD)
    scale = None if per_row_scale else (1, start // group, length // group, length // group)
    return whole | {"weight_packed": packed, "weight_scale": scale}


def _check_quantized(folder, module: str, scheme: WeightScheme, stored: dict, shape_value: torch.Tensor | None,
                     n: int, k: int) -> None:
    """The stored tensors of one quantized layer, from the file's headers ({suffix: (dtype, shape)}),
    against the dense weight [n, k] the model has: checked whole, before any rank reads its share."""
    def bad(msg):
        raise CheckpointError(f"{folder}: {module}: {msg}")

    if "weight_scale" not in stored:
        bad("weight_scale is missing")
    scale_dtype, scale_shape = stored["weight_scale"]
    if scale_dtype is None or not scale_dtype.is_floating_point:
        bad(f"weight_scale has dtype {scale_dtype}")
    if scheme.kind == "w4a16":
        if shape_value is not None and tuple(int(v) for v in shape_value.tolist()) != (n, k):
            bad(f"weight_shape {shape_value.tolist()} != this model's [{n}, {k}]")
        group = scheme.group_size_for(k)
        packed_dtype, packed_shape = stored["weight_packed"]
        if packed_dtype != torch.int32 or tuple(packed_shape) != (n, packed_words(k)):
            bad(f"weight_packed {packed_dtype} {tuple(packed_shape)} != int32 [{n}, {packed_words(k)}]")
        if tuple(scale_shape) != (n, k // group):
            bad(f"weight_scale {tuple(scale_shape)} != [{n}, {k // group}] (group_size {group})")
    else:
        if tuple(stored["weight"][1]) != (n, k):
            bad(f"weight {tuple(stored['weight'][1])} != [{n}, {k}]")
        want = (n, 1) if scheme.strategy == "channel" else (1,)
        if tuple(scale_shape) != want and not (scheme.strategy == "tensor" and math.prod(scale_shape) == 1):
            bad(f"weight_scale {tuple(scale_shape)} != {list(want)} ({scheme.strategy} strategy)")
