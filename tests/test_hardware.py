"""pixtral_fast.hardware: the limits a roofline is given against, by the name the GPU reports."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pixtral_fast import hardware


@pytest.mark.parametrize("name, spec", [
    ("NVIDIA H200", hardware.H200), ("NVIDIA H200 NVL", hardware.H200),
    ("NVIDIA H100 80GB HBM3", hardware.H100_SXM), ("NVIDIA H100 PCIe", hardware.H100_PCIE),
    ("NVIDIA H100 NVL", hardware.H100_NVL), (None, hardware.H200), ("NVIDIA A100-SXM4-80GB", hardware.H200),
])
def test_spec_by_device_name(name, spec):
    assert hardware.spec_for(name) is spec
    assert hardware.is_listed(name) is (name is not None and "A100" not in name)


def test_h100_sxm_and_h200_share_compute_not_memory():
    h100, h200 = hardware.H100_SXM, hardware.H200
    assert (h100.sms, h100.boost_hz, h100.bf16_flops) == (h200.sms, h200.boost_hz, h200.bf16_flops)
    assert h100.hbm_bytes_per_s / h200.hbm_bytes_per_s == pytest.approx(3.35 / 4.8)
    assert h100.memory_bytes < h200.memory_bytes


def test_current_is_the_h200_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        assert hardware.current() is hardware.spec_for(torch.cuda.get_device_name(0))
    else:
        assert hardware.current() is hardware.H200


def test_importable_without_torch(tmp_path):
    """bench/report.py loads the file by path after every device-check stage: no torch import."""
    path = Path(hardware.__file__)
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('hw', {str(path)!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['hw'] = m; spec.loader.exec_module(m)\n"
            "assert m.spec_for('NVIDIA H100 80GB HBM3').hbm_bytes_per_s == 3.35e12\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
