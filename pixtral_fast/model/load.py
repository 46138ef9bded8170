"""pf.load_model: a config + checkpoint folder -> a ready Pixtral on the target device."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from pixtral_fast.config import ModelArgs
from pixtral_fast.model.pixtral import Pixtral, build_model
from pixtral_fast.parallel.comm import Collectives
from pixtral_fast.weights import CheckpointError, load_state_dict

log = logging.getLogger("pixtral_fast")

MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what every op accepts (DESIGN §3)


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No checkpoint at the given path (a FileNotFoundError too, for callers that catch that)."""


def checkpoint_path(path) -> Path:
    """`path` as a Path; ValueError naming it when it is not a str or os.PathLike (pf.load_model(5)
    would otherwise fail with a TypeError from deep inside pathlib)."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or os.PathLike (a checkpoint folder), got {type(path).__name__}")
    return Path(path)


def read_args(path: str | Path) -> ModelArgs:
    """params.json (Mistral format) wins over config.json (HF format)."""
    path = checkpoint_path(path)
    if not path.exists():
        raise CheckpointNotFound(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise CheckpointNotFound(f"{path} is a file, not a checkpoint folder (a folder holding params.json + "
                                 "consolidated.safetensors, or HF config.json + model*.safetensors)")
    if (path / "params.json").is_file():
        return ModelArgs.from_params_json(path / "params.json")
    if (path / "config.json").is_file():
        return ModelArgs.from_hf_config(path / "config.json")
    raise CheckpointNotFound(f"{path}: neither params.json (Mistral format) nor config.json (HF format) found")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device) -> torch.device:
    """`device` (None: the default) as a torch.device this machine has, or a ValueError naming it:
    'gpu', '' or 'cuda:7' on a one-GPU (or CPU-only) machine fail here, not inside the first launch."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise ValueError(f"device {device!r}: only 'cpu' and 'cuda' devices are supported")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here (no GPU, or a CPU-only torch build)")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return parsed


def check_dtype(dtype) -> torch.dtype:
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: use one of {', '.join(map(str, MODEL_DTYPES))}")
    return dtype


def quant_config(path: str | Path):
    """The compressed-tensors QuantConfig of an HF folder whose config.json carries one; None for
    a dense checkpoint (a consolidated one never is quantized)."""
    from pixtral_fast.quant.config import QuantConfig

    folder = Path(path)
    return None if (folder / "params.json").is_file() else QuantConfig.from_folder(folder)


def is_quantized(path: str | Path) -> bool:
    """An HF folder whose config.json carries a compressed-tensors quantization_config."""
    return quant_config(path) is not None


def load_model(path: str | Path, device=None, dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
               progress: bool = True, comm: Collectives | None = None) -> Pixtral:
    """`comm`: load only this tensor-parallel rank's share (see pixtral_fast/parallel/plan.py).
    Each argument, the config and the split are checked once, dense and packed alike."""
    path = checkpoint_path(path)
    device, dtype = resolve_device(device), check_dtype(dtype)
    args = read_args(path)
    # The rank's model on the meta device (no memory), before any tensor is read: building it
    # checks that the decoder splits (ShardPlan.local_text_args).
    model = build_model(args, device="meta", dtype=dtype, comm=comm)
    shard = comm.plan if comm is not None and comm.size > 1 else None
    qconfig = quant_config(path)
    if qconfig is not None:  # compressed-tensors: the weights stay packed (pixtral_fast/quant/)
        _load_packed(model, path, args, qconfig, device, dtype, progress, shard)
    else:
        state = load_state_dict(path, args, device, dtype, progress=progress, shard=shard)
        model.load_state_dict(state, assign=True, strict=True)
    model.set_backend(backend).eval().requires_grad_(False)  # inference only: no autograd graphs
    log.info("loaded %s on %s (%s), backend=%s", path, device, dtype, model.backend)
    return model


def check_tensor_parallel_split(path: str | Path, size: int) -> None:
    """The checks a `size`-way split of the checkpoint must pass, before any rank starts: the
    decoder divides (ShardPlan.check: ValueError), and a quantized checkpoint's packed layers cut
    on pack and group boundaries (CheckpointError naming the layer)."""
    from pixtral_fast.parallel.plan import ShardPlan
    from pixtral_fast.packed_weights import check_split

    path = checkpoint_path(path)
    args = read_args(path)
    ShardPlan(size).check(args.text)
    qconfig = quant_config(path) if size > 1 else None
    if qconfig is not None:
        check_split(path, args, qconfig, build_model(args, device="meta"), size)


def load_quantized_model(path: str | Path, device=None, dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
                         progress: bool = True, comm: Collectives | None = None) -> Pixtral:
    """pf.load_model for a compressed-tensors HF folder only: any other checkpoint is a
    CheckpointError."""
    if not is_quantized(checkpoint_path(path)):
        raise CheckpointError(f"{path}: config.json has no quantization_config")
    return load_model(path, device, dtype, backend, progress, comm)


def _load_packed(model: Pixtral, path: Path, args: ModelArgs, qconfig, device: torch.device, dtype: torch.dtype,
                 progress: bool, shard) -> None:
    """Fills `model` (built on the meta device, this rank's share with `shard`) with its packed
    weights, read by pixtral_fast/packed_weights.py into QuantLinear layers bound to the model."""
    from pixtral_fast.quant.linear import bind_quant_layers, repack_quant_layers, swap_quantized_modules
    from pixtral_fast.packed_weights import read_quantized_state

    # compressed-tensors' class targets match the whole model's modules (a rank's output head is no
    # nn.Linear): every rank and TP=1 pick the same layers
    whole = model if shard is None else build_model(args, device="meta", dtype=dtype)
    state, schemes = read_quantized_state(path, args, qconfig, whole, device, dtype, progress=progress, shard=shard)
    scale_dtypes = {cons: state[f"{cons}.weight_scale"].dtype for cons in schemes}
    swap_quantized_modules(model, schemes, scale_dtypes.__getitem__)
    model.load_state_dict(state, assign=True, strict=True)
    del state
    repack_quant_layers(model)
    bind_quant_layers(model)
