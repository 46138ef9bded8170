"""pf.load_model / Engine.from_pretrained with a path that is not a path: a ValueError naming it,
not a TypeError from inside pathlib."""
import pytest

import pixtral_fast as pf


@pytest.mark.parametrize("bad", [5, None, 1.5, b"/tmp", ["/tmp"]], ids=repr)
def test_load_model_path_must_be_a_str_or_pathlike(bad):
    with pytest.raises(ValueError, match=f"path must be a str or os.PathLike .*got {type(bad).__name__}"):
        pf.load_model(bad, device="cpu")


def test_a_missing_folder_still_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        pf.load_model(tmp_path / "absent", device="cpu")
