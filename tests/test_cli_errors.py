"""Every user error of `pixtral-fast` is one line `pixtral-fast: error: ...` on stderr and a non-zero
exit, never a traceback. Most cases run in-process through cli.main (the same top-level handler the
console entry calls); the real console entry runs for what only a process shows: the exit status
and stderr of a failing run, a closed stdout, and SIGINT."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pixtral_fast import cli
from pixtral_fast.tiny import make_tiny
from pixtral_fast.weights import CheckpointError

ENTRY = Path(sys.executable).parent / "pixtral-fast"
RUN = ["--device", "cpu", "--dtype", "fp32", "--backend", "reference"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("cli_tiny"), seed=0)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("bad")
    (d / "broken_json").mkdir()
    (d / "broken_json" / "params.json").write_text("{")
    (d / "not_object").mkdir()
    (d / "not_object" / "params.json").write_text("[1, 2]")
    (d / "huge").mkdir()
    raw = json.loads((tiny / "params.json").read_text()) | {"n_layers": 10**7}
    (d / "huge" / "params.json").write_text(json.dumps(raw))
    (d / "text.png").write_text("this is not an image")
    (d / "a_file").write_text("x")
    return d


def assert_one_error_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("pixtral-fast: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def run_main(argv, capsys, code=2):
    with pytest.raises(SystemExit) as e:
        try:
            cli.main(argv)
        except KeyboardInterrupt:  # would otherwise stop the whole pytest session
            pytest.fail("KeyboardInterrupt escaped cli.main")
    assert e.value.code == code
    return capsys.readouterr().err


GENERATE_CASES = {  # name: (extra argv, what the one line must name)
    "device gpu": (["--device", "gpu"], ["--device", "'gpu'"]),
    "device empty": (["--device", ""], ["--device", "''"]),
    "device mps": (["--device", "mps"], ["'mps'", "only 'cpu' and 'cuda'"]),
    "temperature nan": (["--temperature", "nan"], ["temperature", "nan"]),
    "temperature inf": (["--temperature", "inf"], ["temperature", "inf"]),
    "temperature -1": (["--temperature", "-1"], ["temperature"]),
    "temperature abc": (["--temperature", "abc"], ["--temperature", "abc"]),
    "top_p 0": (["--top-p", "0"], ["top_p"]),
    "top_p nan": (["--top-p", "nan"], ["top_p"]),
    "top_k -1": (["--top-k", "-1"], ["top_k"]),
    "max_new_tokens -5": (["--max-new-tokens", "-5"], ["max_new_tokens"]),
    "max_new_tokens 0": (["--max-new-tokens", "0"], ["max_new_tokens"]),
    "max_batch_size 0": (["--max-batch-size", "0"], ["--max-batch-size", ">= 1"]),
    "unknown flag": (["--temprature", "1"], ["--temprature"]),
}


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_generate_argument_errors(tmp_path, capsys, case):
    """The model folder does not exist: each bad argument must be named before any loading starts."""
    extra, needles = GENERATE_CASES[case]
    argv = ["generate", "--model", str(tmp_path / "absent"), "--prompt", "hi", *RUN, *extra]
    assert_one_error_line(run_main(argv, capsys), *needles)


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="cuda:7 exists here")
def test_a_gpu_this_machine_does_not_have(tiny, capsys):
    err = run_main(["generate", "--model", str(tiny), "--prompt", "hi", "--device", "cuda:7"], capsys)
    assert_one_error_line(err, "'cuda:7'")


@pytest.mark.parametrize("model, needles", [
    ("broken_json", ["params.json", "not valid JSON"]),
    ("not_object", ["params.json", "JSON object"]),
    ("huge", ["params.json", "n_layers", "out of range"]),
    ("a_file", ["a_file is a file, not a checkpoint folder"]),
    ("absent", ["absent: no such checkpoint folder"]),
])
def test_generate_model_errors(bad_files, capsys, model, needles):
    t0 = time.perf_counter()
    err = run_main(["generate", "--model", str(bad_files / model), "--prompt", "hi", *RUN], capsys)
    assert_one_error_line(err, *needles)
    assert time.perf_counter() - t0 < 5, "config errors must come before any loading"


@pytest.mark.parametrize("image, needles", [
    ("text.png", ["text.png is not a readable image"]),
    ("absent.png", ["--image", "absent.png: no such file"]),
    (".", ["--image", "is not a file"]),
])
def test_generate_image_errors(bad_files, capsys, image, needles):
    argv = ["generate", "--model", str(bad_files / "absent"), "--prompt", "hi", "--image", str(bad_files / image),
            *RUN]  # the image is checked before the (missing) model is looked at
    assert_one_error_line(run_main(argv, capsys), *needles)


def test_other_commands(tmp_path, bad_files, capsys):
    cases = [
        (["make-tiny", str(bad_files / "a_file" / "sub")], ["a_file"]),
        (["make-tiny", str(tmp_path / "t"), "--seed", "-1"], ["--seed", ">= 0"]),
        (["convert-hf", str(tmp_path / "absent"), str(tmp_path / "out")], ["absent", "no such file"]),
        (["bench", "--params", str(bad_files / "huge"), "--random-weights"], ["n_layers"]),
        (["bench", "--params", str(tmp_path / "absent.json"), "--random-weights"], ["absent.json"]),
        (["bench", "--params", str(bad_files / "not_object"), "--random-weights", "--batch", "0"], ["--batch"]),
        (["demo", "--dir", str(tmp_path / "d"), "--device", "gpu"], ["'gpu'"]),
        (["nonsense"], ["nonsense"]),
        ([], ["command"]),
    ]
    for argv, needles in cases:
        assert_one_error_line(run_main(argv, capsys), *needles)
    assert not (tmp_path / "d").exists(), "a bad device must fail before the demo writes anything"


def test_demo_api_checks_the_device_before_writing(tmp_path):
    from pixtral_fast import demo

    with pytest.raises(ValueError, match="'gpu'"):
        demo.run(tmp_path / "d", device="gpu")
    assert not (tmp_path / "d").exists()


def test_bench_image_size_must_fit_the_model(tiny, capsys):
    argv = ["bench", "--params", str(tiny / "params.json"), "--random-weights", "--image-size", "1000", *RUN]
    assert_one_error_line(run_main(argv, capsys), "image_size 1000", "patch size 16")


@pytest.fixture
def generate_raising(monkeypatch, tiny):
    """`generate` whose engine construction raises the given exception."""
    from pixtral_fast.runtime.engine import Engine

    def install(exc):
        def boom(*args, **kwargs):
            raise exc
        monkeypatch.setattr(Engine, "from_pretrained", boom)
        return ["generate", "--model", str(tiny), "--prompt", "hi", *RUN]
    return install


def test_error_kinds(generate_raising, capsys):
    from mistral_common.exceptions import InvalidMessageStructureException

    multi = CheckpointError("ckpt does not match its config:\n  missing (1): a.weight\n  unexpected (1): b.weight")
    cases = [
        (multi, 2, ["ckpt does not match its config: missing (1): a.weight; unexpected (1): b.weight"]),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), 2, ["out of memory"]),
        (PermissionError(13, "Permission denied", "/x/consolidated.safetensors"), 2,
         ["/x/consolidated.safetensors: Permission denied"]),
        (InvalidMessageStructureException("bad message"), 2, ["bad message"]),
        (KeyboardInterrupt(), 130, ["interrupted"]),
        (KeyError("boom"), 1, ["internal error: KeyError", "--debug"]),
        (ValueError(), 2, ["ValueError"]),
    ]
    for exc, code, needles in cases:
        assert_one_error_line(run_main(generate_raising(exc), capsys, code=code), *needles)


def test_debug_shows_the_real_exception(generate_raising):
    for argv in (["--debug", *generate_raising(KeyError("boom"))], generate_raising(KeyError("boom")) + ["--debug"]):
        with pytest.raises(KeyError, match="boom"):
            cli.main(argv)


def test_commands_are_registered_from_one_list():
    names = set(cli.parser()._subparsers._group_actions[0].choices)
    assert {"generate", "demo", "bench", "make-tiny", "convert-hf"} <= names and len(cli.COMMANDS) == len(names)


# -- the real console entry ----------------------------------------------------------------------

def entry(*argv: str, **kwargs) -> subprocess.Popen:
    # A shell may start background jobs with SIGINT ignored; the user's terminal does not.
    return subprocess.Popen([str(ENTRY), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def test_console_entry_errors(tiny, bad_files):
    """Two failing runs at once (each process start costs seconds): exit 2, one line, no traceback."""
    procs = {("--device",): entry("generate", "--model", str(tiny), "--prompt", "hi", "--device", "cuda:7"),
             ("params.json", "n_layers"): entry("generate", "--model", str(bad_files / "huge"), "--prompt", "hi",
                                                *RUN)}
    for needles, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and out == ""
        assert_one_error_line(err, *needles)
        assert len(err.splitlines()) == 1, err


def test_closed_stdout_ends_quietly(tiny):
    """`pixtral-fast generate ... | head -c 1`: no BrokenPipeError traceback, the SIGPIPE status."""
    proc = entry("generate", "--model", str(tiny), "--prompt", "Count to a million.", "--max-new-tokens", "100000",
                 *RUN)
    try:
        assert proc.stdout.read(1)
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == cli.EXIT_BROKEN_PIPE, err
    assert "Traceback" not in err and "error" not in err.lower() and "Exception ignored" not in err, err


def test_sigint_exits_130_with_one_line(tiny):
    proc = entry("generate", "--model", str(tiny), "--prompt", "Count to a million.", "--max-new-tokens", "100000",
                 *RUN)
    try:
        for line in proc.stderr:  # the engine line comes once the model is loaded and decoding starts
            if line.startswith("pixtral-fast: cpu"):
                break
        assert proc.stdout.read(1)  # decoding
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == cli.EXIT_INTERRUPTED, err
    assert_one_error_line(err, "interrupted")
