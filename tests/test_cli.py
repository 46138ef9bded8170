"""The `pixtral-fast` command end to end on tiny checkpoints (in-process, CPU)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import pixtral_fast as pf

from pixtral_fast.cli import main
from pixtral_fast.tiny import TINY_ARGS


def test_make_tiny_then_generate_with_an_image(tmp_path, capsys):
    main(["make-tiny", str(tmp_path / "ckpt"), "--seed", "3"])
    assert (tmp_path / "ckpt" / "consolidated.safetensors").is_file()
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    capsys.readouterr()
    main(["generate", "--model", str(tmp_path / "ckpt"), "--image", str(tmp_path / "a.png"), "--prompt", "What?",
          "--max-new-tokens", "5", "--device", "cpu", "--dtype", "fp32", "--backend", "reference"])
    printed = capsys.readouterr()
    engine = pf.Engine.from_pretrained(tmp_path / "ckpt", device="cpu", dtype=torch.float32, backend="reference",
                                       progress=False)
    messages = [{"role": "user", "content": [{"type": "image", "image": tmp_path / "a.png"},
                                             {"type": "text", "text": "What?"}]}]
    expected = engine.generate(messages, max_new_tokens=5).text
    assert expected and printed.out == expected + "\n"
    assert "kernels=reference" in printed.err  # says what runs


def test_generate_reports_a_bad_image(tmp_path, capsys):
    main(["make-tiny", str(tmp_path / "ckpt")])
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path / "ckpt"), "--image", str(tmp_path / "bad.png"), "--prompt", "x",
              "--device", "cpu", "--backend", "reference"])
    assert e.value.code == 2 and "bad.png is not a readable image" in capsys.readouterr().err


def test_demo_answers_with_the_shipped_model(capsys):
    main(["demo", "--sample", "16", "--device", "cpu", "--backend", "reference"])
    out = capsys.readouterr().out
    assert out.count("Q: ") == 9 and "easy_vqa/data/test/images/" in out and "time per stage" in out
    assert "accuracy on a fixed sample of 16 test questions: " in out and " right" in out


def test_demo_on_another_checkpoint(tmp_path, capsys):
    """--dir: a random tiny checkpoint is made there; its answers are noise, and the demo says so."""
    main(["demo", "--dir", str(tmp_path / "demo"), "--sample", "4", "--device", "cpu", "--backend", "reference"])
    out = capsys.readouterr().out
    assert "made a tiny checkpoint" in out and "wrong (expected" in out
    assert "accuracy on a fixed sample of 4 test questions: 0/4 = 0.00%" in out


def test_bench_reports_json(tmp_path, capsys):
    params = tmp_path / "params.json"
    params.write_text(json.dumps(TINY_ARGS.to_params_json()))
    main(["bench", "--params", str(params), "--random-weights", "--batch", "1", "3", "--image-size", "64",
          "--decode-steps", "3", "--device", "cpu", "--dtype", "fp32", "--backend", "reference"])
    report = json.loads(capsys.readouterr().out)
    assert report["time_to_first_token"]["prompt_tokens"] == 2 + 16 + 4 + 17
    assert [d["batch"] for d in report["decode"]] == [1, 3]
    assert all(d["tok_per_s"] > 0 and 0 < d["fraction_of_roofline"] for d in report["decode"])
    assert all(d["stopped_early"] == 0 for d in report["decode"])  # every sequence decoded every step
