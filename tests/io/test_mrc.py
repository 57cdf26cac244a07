"""MRC/MRCS I/O: round trips with voxel size and origin, memory mapping, and bad files."""

from __future__ import annotations

import os
import shutil

import mrcfile
import numpy as np
import pytest

from cryoace.errors import CryoaceInputError
from cryoace.io.mrc import open_mrc, read_volume, write_mrc


def test_volume_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(16, 16, 16)).astype(np.float32)
    vol[1, 2, 3] = 7.0  # (z, y, x) order is kept
    path = tmp_path / "vol.mrc"
    write_mrc(path, vol, voxel_size=1.5, origin=(1.0, -2.0, 3.5))
    back = read_volume(path)
    np.testing.assert_array_equal(back.data, vol)
    assert back.data[1, 2, 3] == 7.0
    assert back.voxel_size == pytest.approx(1.5)
    assert back.origin == pytest.approx((1.0, -2.0, 3.5))
    assert [p.name for p in tmp_path.iterdir()] == ["vol.mrc"]  # no temporary file left behind
    with mrcfile.open(path) as mrc:  # a standard file other programs read the same way
        np.testing.assert_array_equal(mrc.data, vol)
        assert mrc.voxel_size.x == pytest.approx(1.5) and mrc.header.origin.y == pytest.approx(-2.0)


def test_stack_round_trip_is_memory_mapped(tmp_path):
    stack = np.arange(5 * 8 * 8, dtype=np.float32).reshape(5, 8, 8)
    path = tmp_path / "s.mrcs"
    write_mrc(path, stack, voxel_size=2.25)
    with mrcfile.open(path) as mrc:
        assert mrc.is_image_stack()
    back = open_mrc(path)
    assert isinstance(back.data, np.memmap)
    np.testing.assert_array_equal(back.data, stack)
    assert back.voxel_size == pytest.approx(2.25)
    assert open_mrc(path, mmap=False).data.shape == (5, 8, 8)


@pytest.mark.parametrize("name,shape,voxel", [
    ("trpv1_cryojax/trpv1_small_stack.mrcs", (10, 48, 48), 4.88),
    ("relion31_cryodrgn/relion31.mrcs", (5, 256, 256), 1.0),
    ("empiar10076_cryodrgn/empiar_10076_7.mrc", (7, 320, 320), 0.0),  # no MAP id: permissive
    ("cryodrgn_hand/hand.mrcs", (100, 64, 64), 1.0),
    ("sim_aspire_spike_L64_ctf_snr0.1/particles_0_499.mrcs", (500, 64, 64), 3.0),
    ("relion_project_aspire/rln_proj_64.mrcs", (5, 64, 64), 0.0),
])
def test_real_stacks(particles_dir, name, shape, voxel):
    mrc = open_mrc(particles_dir / name)
    assert mrc.data.shape == shape and isinstance(mrc.data, np.memmap)
    assert mrc.voxel_size == pytest.approx(voxel, abs=1e-6)
    assert np.isfinite(mrc.data[0]).all()


def test_every_particle_stack_opens(particles_dir):
    files = sorted(particles_dir.glob("*/*.mrc*"))
    assert len(files) >= 11
    for path in files:
        mrc = open_mrc(path)
        assert mrc.data.ndim == 3 and mrc.data.shape[1] == mrc.data.shape[2], path
        assert np.isfinite(mrc.data[-1]).all(), path


def test_reference_volume(test_data):
    vol = read_volume(test_data / "particles/relion_project_aspire/clean70SRibosome_vol_64_aspire_downsampled.mrc")
    assert vol.data.shape == (64, 64, 64) and vol.data.dtype == np.float32


def test_truncated_stack(particles_dir, tmp_path):
    path = tmp_path / "cut.mrcs"
    shutil.copy(particles_dir / "relion31_cryodrgn/relion31.mrcs", path)
    path.chmod(0o644)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 256 * 256 * 4 - 100)
    with pytest.raises(CryoaceInputError, match="truncated") as err:
        open_mrc(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_bad_files(tmp_path):
    with pytest.raises(CryoaceInputError, match="not found") as err:
        open_mrc(tmp_path / "missing.mrc")
    assert "missing.mrc" in str(err.value)
    junk = tmp_path / "junk.mrc"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CryoaceInputError) as err:
        open_mrc(junk)
    assert str(junk) in str(err.value)
    for shape, pattern in [((8, 8, 6), "cubic"), ((9, 9, 9), "odd")]:
        p = tmp_path / f"v{shape[-1]}.mrc"
        write_mrc(p, np.zeros(shape, np.float32), voxel_size=1.0)
        with pytest.raises(CryoaceInputError, match=pattern) as err:
            read_volume(p)
        assert str(p) in str(err.value)
    nan = np.zeros((8, 8, 8), np.float32)
    nan[2, 3, 4] = np.nan
    p = tmp_path / "nan.mrc"
    write_mrc(p, nan, voxel_size=1.0)
    with pytest.raises(CryoaceInputError, match="NaN") as err:
        read_volume(p)
    assert str(p) in str(err.value)


def test_atomic_write_has_ordinary_permissions(tmp_path):
    """The temporary file is private while written; the result gets the usual umask permissions."""
    import os

    from cryoace.io.mrc import write_mrc

    out = tmp_path / "perm.mrc"
    write_mrc(out, np.zeros((4, 4, 4), np.float32), 1.0)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["perm.mrc"]


def test_stack_writer_streams_a_stack_mrcfile_reads_back(tmp_path):
    """MrcStackWriter (the simulator's writer): blocks appended in order give the same file content,
    header statistics and voxel size as writing the whole stack at once; too few images, or an error
    inside the block loop, leave no file and no temporary file behind."""
    from cryoace.io.mrc import MrcStackWriter

    rng = np.random.default_rng(3)
    stack = rng.normal(size=(7, 8, 8)).astype(np.float64) * 4 + 1
    path = tmp_path / "streamed.mrcs"
    with MrcStackWriter(path, 7, 8, voxel_size=1.5) as writer:
        for start in range(0, 7, 3):
            writer.write(stack[start:start + 3])
    with mrcfile.open(path) as mrc:
        assert mrc.is_image_stack() and mrc.data.dtype == np.float32
        assert np.array_equal(mrc.data, stack.astype(np.float32))
        assert float(mrc.voxel_size.x) == pytest.approx(1.5)
        h = mrc.header
        assert float(h.dmin) == pytest.approx(stack.astype(np.float32).min())
        assert float(h.dmax) == pytest.approx(stack.astype(np.float32).max())
        assert float(h.dmean) == pytest.approx(stack.astype(np.float32).mean(), rel=1e-6)
        assert float(h.rms) == pytest.approx(stack.astype(np.float32).std(), rel=1e-5)
    assert mrcfile.validate(str(path), print_file=open(os.devnull, "w"))

    short = tmp_path / "short.mrcs"
    with pytest.raises(ValueError, match="2 of 7 images"):
        with MrcStackWriter(short, 7, 8, voxel_size=1.0) as writer:
            writer.write(stack[:2])
    with pytest.raises(RuntimeError, match="renderer failed"):
        with MrcStackWriter(short, 7, 8, voxel_size=1.0) as writer:
            writer.write(stack[:2])
            raise RuntimeError("renderer failed")
    with pytest.raises(ValueError, match="shape"):
        with MrcStackWriter(short, 7, 8, voxel_size=1.0) as writer:
            writer.write(stack[:2, :4])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed.mrcs"]
