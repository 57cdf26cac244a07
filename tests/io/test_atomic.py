"""Atomic writes: a failed write names the output (not its hidden temporary) and leaves nothing; other
errors inside the block pass through unchanged; related outputs appear together or not at all."""

from __future__ import annotations

import errno

import pytest

from cryoace.errors import CryoaceInputError
from cryoace.io.atomic import atomic_path, atomic_paths


def test_nameless_write_error_names_the_target(tmp_path):
    target = tmp_path / "map.mrc"
    with pytest.raises(OSError) as err:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed") from OSError(errno.ENOSPC, "No space left on device")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_input_errors_inside_the_block_pass_through(tmp_path):
    missing = tmp_path / "input.mrc"
    with pytest.raises(FileNotFoundError) as err:
        with atomic_path(tmp_path / "out.mrc"):
            missing.read_bytes()
    assert err.value.filename == str(missing)
    with pytest.raises(CryoaceInputError, match="bad input"):
        with atomic_path(tmp_path / "out.mrc"):
            try:
                missing.read_bytes()
            except OSError:
                raise CryoaceInputError("bad input") from None
    assert list(tmp_path.iterdir()) == []


def test_outputs_appear_together_or_not_at_all(tmp_path):
    names = [tmp_path / "a.mrc", tmp_path / "b.mrc"]
    with pytest.raises(OSError):
        with atomic_paths(*names) as (a, b):
            a.write_text("a")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with atomic_paths(*names) as (a, b):
        a.write_text("a")
        b.write_text("b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mrc", "b.mrc"]


def test_a_directory_is_not_a_file_name(tmp_path):
    with pytest.raises(IsADirectoryError, match="give a file name"):
        with atomic_path(tmp_path):
            pass
