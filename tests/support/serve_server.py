"""The real server in a subprocess (`python -m pixtral_fast.serve.command`) on an ephemeral
port of 127.0.0.1, for the serve tests and bench/serve_load.py, plus small image helpers."""
from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

CPU_ARGS = ["--device", "cpu", "--dtype", "float32", "--backend", "reference"]


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, startup_timeout: float = 180.0, wait: bool = True):
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "pixtral_fast.serve.command", "--host", "127.0.0.1",
                                      "--port", "0", *args], stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.log_path.parent)
        self.url = self.wait_ready(startup_timeout) if wait else None

    def wait_ready(self, timeout: float = 180.0) -> str:
        """Blocks until /health answers 200; the server's base URL."""
        deadline = time.monotonic() + timeout
        url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            if url is None:
                m = re.search(r"on (http://127\.0\.0\.1:\d+)", self.log())
                url = m.group(1) if m else None
            if url is not None:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        self.url = url
                        return url
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        self.kill()
        raise TimeoutError(f"the server did not become healthy in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM; the exit code (the server gets `timeout` seconds to stop)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def picture(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def user_message(text: str, *image_urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def metric(url: str, name: str, labels: dict | None = None) -> float:
    """One sample of the server's /metrics, read with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or all(sample.labels.get(k) == v for k, v in labels.items())):
                return sample.value
    raise KeyError(name)
