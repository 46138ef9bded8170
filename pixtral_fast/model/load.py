"""pf.load_model: a config + checkpoint folder -> a ready Pixtral on the target device."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from pixtral_fast.config import ModelArgs
from pixtral_fast.model.pixtral import Pixtral, build_model
from pixtral_fast.weights import load_state_dict

log = logging.getLogger("pixtral_fast")


def read_args(path: str | Path) -> ModelArgs:
    """params.json (Mistral format) wins over config.json (HF format)."""
    path = Path(path)
    if (path / "params.json").is_file():
        return ModelArgs.from_params_json(path / "params.json")
    if (path / "config.json").is_file():
        return ModelArgs.from_hf_config(path / "config.json")
    raise FileNotFoundError(f"{path}: neither params.json (Mistral format) nor config.json (HF format) found")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: str | Path, device=None, dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
               progress: bool = True) -> Pixtral:
    device = torch.device(device) if device is not None else default_device()
    args = read_args(path)
    state = load_state_dict(path, args, device, dtype, progress=progress)
    model = build_model(args, device="meta", dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.set_backend(backend).eval().requires_grad_(False)  # inference only: no autograd graphs
    log.info("loaded %s on %s (%s), backend=%s", path, device, dtype, model.backend)
    return model
