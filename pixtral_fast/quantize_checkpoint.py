"""`pixtral-fast quantize SRC DST --scheme fp8|w4a16`: round-to-nearest quantization of a checkpoint
into an HF folder in the compressed-tensors format (what transformers + compressed-tensors and
vLLM read).

  * w4a16: int4 symmetric, one scale per `group_size` inputs (`pack-quantized`);
  * fp8: e4m3 with one scale per output channel, weight-only (`float-quantized`, no activation
    scheme: the kernels read activations as they are).
Scales are those of compressed-tensors' own round-to-nearest (max|w| / 7.5 per group; max|w| / 448
per channel), in the checkpoint's dtype. The decoder's linear layers are quantized (and the ViT's
with include_vision); embeddings, lm_head, norms and the projector stay dense.

Memory: the source is memory-mapped and read one tensor at a time; each dense weight is
quantized and dropped before the next is read, and output shards are flushed every
`shard_bytes`, so no more than one dense weight plus one output shard is held.

It reads and writes whole checkpoints (a consolidated SRC is exported to HF first, its tokenizer
files copied), so it sits beside hf_export.py, above the model; the formats and quantizers it
applies are pixtral_fast/quant/'s.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from pixtral_fast.quant.formats import quantize_fp8, quantize_w4a16
from pixtral_fast.weights import CheckpointError, hf_files, map_file, read_records, read_tensor

SCHEMES = ("w4a16", "fp8")
_DECODER_LINEAR = re.compile(r"^(model\.language_model|language_model\.model)\.layers\.\d+\."
                             r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
_VISION_LINEAR = re.compile(r"^(model\.)?vision_tower\.transformer\.layers\.\d+\."
                            r"(attention\.[qkvo]_proj|feed_forward\.(gate|up|down)_proj)\.weight$")
_WEIGHT_FILES = re.compile(r"^model.*\.safetensors(\.index\.json)?$")


def quantization_config(scheme: str, group_size: int, include_vision: bool) -> dict:
    """The config.json `quantization_config` compressed-tensors writes for this scheme."""
    fmt = "pack-quantized" if scheme == "w4a16" else "float-quantized"
    if scheme == "w4a16":
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": group_size,
                   "strategy": "group", "dynamic": False}
    else:
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                   "strategy": "channel", "dynamic": False}
    ignore = ["lm_head", "re:.*multi_modal_projector.*"] + ([] if include_vision else ["re:.*vision_tower.*"])
    config = {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": fmt}},
        "format": fmt, "global_compression_ratio": None, "ignore": ignore, "kv_cache_scheme": None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
        "transform_config": {},
    }
    try:
        import compressed_tensors

        config["version"] = compressed_tensors.__version__
    except ImportError:
        pass
    return config


def _quantized(name: str, weight: torch.Tensor, scheme: str, group_size: int) -> dict[str, torch.Tensor]:
    module = name[: -len(".weight")]
    if scheme == "w4a16":
        if weight.shape[1] % group_size:
            raise CheckpointError(f"{name} {tuple(weight.shape)}: --group-size {group_size} does not divide its "
                                  f"{weight.shape[1]} inputs")
        packed, scale = quantize_w4a16(weight, group_size)
        return {f"{module}.weight_packed": packed, f"{module}.weight_scale": scale,
                f"{module}.weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64)}
    q, scale = quantize_fp8(weight, per_channel=True)
    return {f"{module}.weight": q, f"{module}.weight_scale": scale}


def quantize_checkpoint(src: str | Path, dst: str | Path, scheme: str, group_size: int = 128,
                        include_vision: bool = False, progress: bool = True, shard_bytes: int = 2 << 30) -> Path:
    """SRC (an HF folder, or a consolidated one, converted to HF first) -> DST in compressed-tensors
    format. Returns DST."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "w4a16" and (isinstance(group_size, bool) or not isinstance(group_size, int)
                              or group_size <= 0 or group_size % 8):
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such checkpoint folder")
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"dst {dst} exists and is not empty")
    if (src / "params.json").is_file() and not (src / "config.json").is_file():
        from pixtral_fast.hf_export import convert_consolidated_to_hf
        from pixtral_fast.tokenizer import TEKKEN_NAMES

        with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as tmp:
            hf = convert_consolidated_to_hf(src, Path(tmp) / "hf", processor=False)  # weights are all it reads
            for f in src.iterdir():  # the checkpoint's own tokenizer (its image section may not be the default's)
                if f.is_file() and (f.name in TEKKEN_NAMES or f.name.startswith("tokenizer.model")):
                    shutil.copy2(f, hf / f.name)
            return quantize_checkpoint(hf, dst, scheme, group_size, include_vision, progress, shard_bytes)
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise CheckpointError(f"{src} is already quantized (config.json has a quantization_config)")
    files = hf_files(src)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        _write_shards(files, dst, scheme, group_size, include_vision, progress, shard_bytes)
        config["quantization_config"] = quantization_config(scheme, group_size, include_vision)
        (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for f in src.iterdir():  # tokenizer, processor, generation config, ...
            if f.is_file() and f.name != "config.json" and not _WEIGHT_FILES.match(f.name):
                shutil.copy2(f, dst / f.name)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)  # it was empty or absent: nothing of the user's is lost
        raise
    return dst


def _write_shards(files, dst: Path, scheme: str, group_size: int, include_vision: bool, progress: bool,
                  shard_bytes: int) -> None:
    records = read_records(files)  # the loaders' header reader: each header read once, every dtype
    mapped = {f: map_file(f) for f in files}
    shards: list[tuple[Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    pending = dst / ".pending"
    pending.mkdir(exist_ok=True)
    with tqdm(total=len(records), desc=f"quantizing ({scheme})", unit="tensor", disable=not progress) as bar:
        for key, record in records.items():
            t = read_tensor(mapped[record.file], record, None)  # a view of the mapped file
            quantize = _DECODER_LINEAR.match(key) or (include_vision and _VISION_LINEAR.match(key))
            out = _quantized(key, t, scheme, group_size) if quantize else {key: t}
            del t  # the dense weight goes now: only its quantized form stays
            for k, v in out.items():
                current[k] = v.contiguous()
                size += v.numel() * v.element_size()
            if size >= shard_bytes:
                shards.append(_flush(current, pending, len(shards)))
                current, size = {}, 0
            bar.update()
    if current or not shards:
        shards.append(_flush(current, pending, len(shards)))
    _finish(shards, pending, dst)


def _flush(tensors: dict[str, torch.Tensor], folder: Path, index: int) -> tuple[Path, list[str]]:
    path = folder / f"part-{index:05d}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, list(tensors)


def _finish(shards: list[tuple[Path, list[str]]], pending: Path, dst: Path) -> None:
    """Names the shards as save_pretrained does, with an index when there is more than one."""
    if len(shards) == 1:
        shards[0][0].rename(dst / "model.safetensors")
    else:
        weight_map, total = {}, len(shards)
        for i, (path, keys) in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            path.rename(dst / name)
            weight_map.update({k: name for k in keys})
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": sum(p.stat().st_size for p in dst.glob("model-*.safetensors"))},
                        "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    pending.rmdir()
