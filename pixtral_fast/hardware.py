"""The limits of the GPUs that rooflines are given against, looked up by the device's name.

Torch-free on purpose: bench/report.py folds the device check after every stage and loads this
file by path, without paying torch's import. What the device says of itself (memory, SM count) is
read from the device where one is present; these are the datasheet figures it cannot tell."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_bytes_per_s: float      # datasheet HBM bandwidth
    bf16_flops: float           # dense bf16 tensor-core rate reached by a large GEMM (DESIGN §4)
    memory_bytes: float         # rated memory, used only where no device is present
    sms: int
    boost_hz: float             # maximum SM clock
    nvlink_bytes_per_s: float   # per direction (0: none)


# H100 SXM and H200 share the GH100 die, its 132 SMs and 1.98 GHz boost: the same compute, with
# HBM3 (3.35 TB/s, 80 GB) against HBM3e (4.8 TB/s, 141 GB). 790 TFLOP/s is the dense bf16 rate
# measured on an H200 (DESIGN §4; the datasheet's 989 is not reached); the PCIe card scales it by
# its SMs x clock.
H200 = GpuSpec("H200", 4.8e12, 790e12, 141e9, 132, 1.98e9, 450e9)
H100_SXM = GpuSpec("H100 SXM", 3.35e12, 790e12, 80e9, 132, 1.98e9, 450e9)
H100_NVL = GpuSpec("H100 NVL", 3.9e12, 790e12 * (132 * 1.785) / (132 * 1.98), 94e9, 132, 1.785e9, 300e9)
H100_PCIE = GpuSpec("H100 PCIe", 2.0e12, 790e12 * (114 * 1.755) / (132 * 1.98), 80e9, 114, 1.755e9, 300e9)
DEFAULT = H200  # the card this project targets, assumed where no GPU is present


def spec_for(device_name: str | None) -> GpuSpec:
    """The spec whose card `device_name` (torch.cuda.get_device_name) names; the H200's for None
    (no GPU) or a card not listed here, whose figures then are only the H200's."""
    name = (device_name or "").upper()
    if "H200" in name:
        return H200
    if "H100" in name:
        if "NVL" in name:
            return H100_NVL
        return H100_PCIE if "PCIE" in name else H100_SXM
    return DEFAULT


def is_listed(device_name: str | None) -> bool:
    """Whether spec_for has this card's own figures (else they are assumed: the H200's)."""
    return any(tag in (device_name or "").upper() for tag in ("H200", "H100"))


def current(device_index: int = 0) -> GpuSpec:
    """The spec of this machine's GPU `device_index`; the H200's where there is none."""
    import torch  # here, not at the top: the file stays importable without torch

    return spec_for(torch.cuda.get_device_name(device_index) if torch.cuda.is_available() else None)
