"""The tensor-parallel entry points for real, on the CPU (gloo): `pixtral-fast serve
--tensor-parallel-size 2` in a subprocess answers a chat request with an image exactly as the
offline TP=1 engine does and, on SIGTERM, exits 0 leaving no worker behind; `torchrun
--nproc-per-node 2 -m pixtral_fast.cli generate ... --tensor-parallel-size 2` prints (from rank 0
only) the TP=1 text; a bad --tensor-parallel-size and a TensorParallelError are one-line errors,
exit 2, for generate, serve and bench."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.cli import main
from pixtral_fast.parallel import TensorParallelError
from pixtral_fast.tiny import make_tiny
from tests.support.serve_server import CPU_ARGS, ServerProcess, data_url, picture, user_message

PROMPT = "Describe the picture, please."
MAX_NEW = 8
IMAGE = (40, 56, 3)  # width, height, seed
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENTRY = Path(sys.executable).with_name("pixtral-fast")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "picture.png"
    picture(*IMAGE).save(path)
    return path


@pytest.fixture(scope="module")
def expected(tiny_dir, image_file):
    """The TP=1 offline engine's greedy answer to PROMPT about image_file."""
    with pf.Engine.from_pretrained(tiny_dir, device="cpu", dtype=torch.float32, backend="reference",
                                   progress=False, num_blocks=64) as engine:
        messages = [{"role": "user", "content": [{"type": "image", "image": image_file},
                                                 {"type": "text", "text": PROMPT}]}]
        text = engine.generate(messages, max_new_tokens=MAX_NEW).text
    assert text
    return text


def children(pid: int) -> dict[int, str]:
    """pid's child processes (the process table, /proc): {pid: command line}."""
    out = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            pass  # gone meanwhile, or not a process
    return out


def running(pid: int) -> bool:
    """Whether pid is still a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_at_tp2_answers_as_tp1_and_sigterm_leaves_no_worker(tiny_dir, tmp_path, request):
    server = ServerProcess(["--model", str(tiny_dir), *CPU_ARGS, "--tensor-parallel-size", "2",
                            "--num-gpu-blocks-override", "64", "--disable-uvicorn-access-log",
                            "--served-model-name", "tiny"], tmp_path / "server.log", wait=False)
    try:
        expected = request.getfixturevalue("expected")  # the TP=1 engine loads while the server starts
        server.wait_ready()
        assert "tensor parallel 2 (gloo)" in server.log()
        workers = children(server.proc.pid)
        assert len(workers) == 1 and "-m pixtral_fast.runtime.tp_worker_main --rank 1 --size 2" in next(iter(workers.values()))
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        url = data_url(picture(*IMAGE))  # image_file's pixels, as a PNG data URL
        answer = client.chat.completions.create(model="tiny", messages=user_message(PROMPT, url),
                                                max_tokens=MAX_NEW, temperature=0)
        assert answer.choices[0].message.content == expected
    finally:
        code = server.terminate()
    assert code == 0, server.log()
    deadline = time.monotonic() + 10
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(running, workers)), f"workers left running: {[p for p in workers if running(p)]}"


def test_torchrun_generate_at_tp2_prints_the_tp1_text_from_rank_0_only(tiny_dir, image_file, expected, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [str(TORCHRUN), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "--no-python", str(ENTRY), "generate", "--model", str(tiny_dir),
            "--image", str(image_file), "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW),
            "--device", "cpu", "--dtype", "fp32", "--backend", "reference", "--tensor-parallel-size", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"  # one copy: rank 1 printed nothing
    assert done.stderr.count("pixtral-fast: tensor parallel 2 (gloo)") == 1


@pytest.mark.parametrize("command", ["generate", "serve", "bench"])
@pytest.mark.parametrize("value,phrase", [("0", "must be >= 1, got 0"), ("two", "not an integer: 'two'")])
def test_a_bad_tensor_parallel_size_is_one_line_exit_2(command, value, phrase, tiny_dir, tmp_path, capsys):
    head = {"generate": ["generate", "--model", str(tiny_dir), "--prompt", "x"],
            "serve": ["serve", "--model", str(tiny_dir)],
            "bench": ["bench", "--params", str(tiny_dir / "params.json"), "--random-weights"]}[command]
    with pytest.raises(SystemExit) as e:
        main([*head, "--tensor-parallel-size", value])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and "--tensor-parallel-size" in err and phrase in err


def test_a_split_the_decoder_cannot_take_is_named_before_any_worker_starts(tiny_dir, capsys):
    started = time.monotonic()
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--device", "cpu",
              "--tensor-parallel-size", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "tensor_parallel_size=3 cannot split this decoder" in err and "n_heads 4" in err
    assert time.monotonic() - started < 30


DEAD = "tensor-parallel engine stopped: worker rank 1 (pid 4242) killed by SIGKILL during the decode step"


@pytest.mark.parametrize("rank", [None, "1"], ids=["spawned", "torchrun rank 1"])
@pytest.mark.parametrize("command", ["generate", "serve"])
def test_a_tensor_parallel_error_is_one_line_exit_2(command, rank, tiny_dir, monkeypatch, capsys):
    def dead_rank(*args, **kwargs):
        raise TensorParallelError(DEAD)

    monkeypatch.setattr(pf.Engine, "from_pretrained", dead_rank)
    if rank is not None:  # under torchrun a rank > 0 says which it is
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
    argv = {"generate": ["generate", "--model", str(tiny_dir), "--prompt", "x", "--device", "cpu"],
            "serve": ["serve", "--model", str(tiny_dir), "--device", "cpu", "--port", "0"]}[command]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--tensor-parallel-size", "2"])
    assert e.value.code == 2
    where = "" if rank is None else f" (rank {rank})"
    assert capsys.readouterr().err == f"pixtral-fast{where}: error: {DEAD}\n"


def test_serve_refuses_dummy_weights_across_ranks(tiny_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(tiny_dir), "--load-format", "dummy", "--device", "cpu", "--port", "0",
              "--tensor-parallel-size", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--load-format dummy with --tensor-parallel-size 2" in err
