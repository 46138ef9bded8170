"""The command line's arguments and streams: stdout not open at all (`>&-`), an --image URL,
make-tiny on a file, and no PIL DecompressionBombWarning from the --image header check."""
import os
import signal
import subprocess

import numpy as np
import pytest
from PIL import Image

from pixtral_fast import cli
from tests.test_cli_errors import ENTRY, RUN, assert_one_error_line, run_main, tiny  # noqa: F401 (fixture)


def test_stdout_not_open_ends_like_a_closed_pipe(tiny):  # noqa: F811
    """`pixtral-fast generate ... >&-`: Python sets sys.stdout to None; that is a closed pipe (exit
    141, quiet), not "internal error: AttributeError: 'NoneType' object has no attribute 'flush'"."""
    def close_stdout():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.close(1)

    proc = subprocess.run([str(ENTRY), "generate", "--model", str(tiny), "--prompt", "hi", "--max-new-tokens", "3",
                           *RUN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=close_stdout)
    assert proc.returncode == cli.EXIT_BROKEN_PIPE, proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr.lower(), proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("url", ["http://x/y.png", "https://example.com/a.jpg"])
def test_an_image_url_is_not_fetched(tmp_path, capsys, url):
    err = run_main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--image", url, *RUN], capsys)
    assert_one_error_line(err, "--image", url, "does not fetch URLs")
    assert "no such file" not in err


def test_make_tiny_on_a_file_says_it_is_a_file(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    err = run_main(["make-tiny", str(target)], capsys)
    assert_one_error_line(err, f"{target} is a file, not a folder")
    assert target.read_text() == "x"


def test_image_header_check_prints_no_decompression_bomb_warning(tmp_path, capsys, monkeypatch):
    """PIL warns past its own MAX_IMAGE_PIXELS (scaled down here to 1000 px; the image has 1200):
    the --image check goes through the library's opener, whose pixel cap is the one that applies."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(path)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.check_images([path])
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
