"""Streamed star files and the compact particle table: a star file read in many small chunks gives
exactly the table read in one, a malformed row anywhere names its line, extra columns stay in the file
until asked for and are written back as their text, and the table costs ~40 bytes per particle."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryoace.errors import CryoaceInputError
from cryoace.io.columns import row_chunks
from cryoace.io.particles import ParticleDataset
from cryoace.io.star import OWNED_COLUMNS, read_star, write_star
from cryoace.io.starloop import iter_loop, scan_star
from cryoace.io.table import EulerPoses
from cryoace.types import CTFParams, Pose

R31 = "relion31_cryodrgn"
SIX = f"{R31}/relion31.6opticsgroups.star"
SIM = "sim_aspire_spike_L64_ctf_snr0.1/particles.star"
STARS = ["empiar10076_cryodrgn/empiar_10076_7.star", f"{R31}/FinalRefinement-OriginalParticles-PfCRT.star",
         f"{R31}/relion31.star", f"{R31}/relion31.v2.star", SIX, f"{R31}/relion5.star",
         "relion_project_aspire/rln_proj_64_shifted.star", SIM, "trpv1_cryojax/trpv1_small_stack.star"]


def assert_same_table(a, b):
    """Every stored value equal (bit for bit), the extra columns included."""
    assert len(a) == len(b) and a.has_ctf == b.has_ctf and a.has_pose == b.has_pose
    np.testing.assert_array_equal(a.pixel_size, b.pixel_size)
    for f in dataclasses.fields(CTFParams):
        assert torch.equal(getattr(a.ctf, f.name), getattr(b.ctf, f.name)), f.name
    if a.has_pose:
        for f in dataclasses.fields(EulerPoses):
            assert torch.equal(getattr(a.pose_angles, f.name), getattr(b.pose_angles, f.name)), f.name
    assert list(a.image_paths) == list(b.image_paths)
    np.testing.assert_array_equal(a.image_indices, b.image_indices)
    assert (a.image_size is None) == (b.image_size is None)
    if a.image_size is not None:
        np.testing.assert_array_equal(a.image_size, b.image_size)
    if a.optics is not None:  # written "200.000000" reads back as the integer 200
        pd.testing.assert_frame_equal(a.optics, b.optics, check_dtype=False)
    pd.testing.assert_frame_equal(a.extra, b.extra, check_like=True)  # a writer may reorder columns


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _first_row_line(path: Path, block: str = "particles") -> int:
    """0-based index (in the file's lines) of the first row of ``data_<block>``."""
    loop = scan_star(path)[block]
    return loop.first_line - 1


def _loop_text(path: Path, block: str = "particles") -> pd.DataFrame:
    """The rows of ``data_<block>`` as the file's text, split on whitespace."""
    return pd.DataFrame([line.split() for line in _lines(path)[_first_row_line(path, block):] if line.strip()],
                        columns=list(scan_star(path)[block].labels))


# --------------------------------------------------------------------------------------------
# Chunked reading
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", STARS)
@pytest.mark.filterwarnings("ignore:.*using RELION's default")  # PfCRT has no amplitude contrast
def test_chunked_read_equals_one_chunk(particles_dir, name):
    assert_same_table(read_star(particles_dir / name, chunk_rows=10 ** 9),
                      read_star(particles_dir / name, chunk_rows=3))


def test_many_chunks_with_optics_merge_and_extra(particles_dir):
    """139 rows in chunks of 7 over 6 optics groups: the same table, and the extra columns are the file's."""
    path = particles_dir / SIX
    loop = scan_star(path)["particles"]
    chunks = list(iter_loop(path, loop, chunk_rows=7))
    assert len(chunks) > 10 and sum(len(c) for c in chunks) == loop.n_rows == 139
    assert [c.index[0] for c in chunks] == [sum(len(c) for c in chunks[:k]) for k in range(len(chunks))]
    small, big = read_star(path, chunk_rows=7), read_star(path, chunk_rows=10 ** 6)
    assert_same_table(small, big)
    reference = starfile.read(path, always_dict=True)["particles"]
    expected = reference.drop(columns=[c for c in reference.columns if c in OWNED_COLUMNS])
    pd.testing.assert_frame_equal(small.extra, expected, check_dtype=False)
    # the merge really differs per group
    assert len(np.unique(small.pixel_size)) == 2 and len(np.unique(small.ctf.cs_mm.numpy())) == 2


def test_blank_lines_comments_and_crlf(particles_dir, tmp_path):
    src = particles_dir / "trpv1_cryojax/trpv1_small_stack.star"
    lines = _lines(src)
    first = _first_row_line(src)
    lines[first + 3:first + 3] = ["", "   \t", "# a comment inside the loop", "  # indented comment"]
    edited = tmp_path / "edited.star"
    edited.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    for chunk_rows in (2, 1000):
        assert_same_table(read_star(src, datadir=src.parent),
                          read_star(edited, datadir=src.parent, chunk_rows=chunk_rows))


# --------------------------------------------------------------------------------------------
# Malformed rows: one line naming the file and the line
# --------------------------------------------------------------------------------------------

def _sim_copy(particles_dir, tmp_path) -> tuple[Path, list[str], int]:
    path = tmp_path / "particles.star"
    shutil.copy(particles_dir / SIM, path)
    return path, _lines(path), _first_row_line(path)


@pytest.mark.parametrize("row,edit", [
    (499, lambda v: v[:-4]),            # truncated last row
    (499, lambda v: v[:len(v) // 2]),   # cut in the middle of the last row
    (30, lambda v: v + ["7"]),           # one value too many, in a middle chunk
    (30, lambda v: v + ["7", "8", "9"]),  # several too many
    (30, lambda v: v[:-1]),              # one value missing
    (28, lambda v: v + ["7"]),           # the first row of a chunk (chunks of 7 rows start at 0, 7, ... 28)
])
def test_wrong_value_count_names_the_line(particles_dir, tmp_path, row, edit):
    path, lines, first = _sim_copy(particles_dir, tmp_path)
    k = first + row
    lines[k] = " ".join(edit(lines[k].split()))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CryoaceInputError) as err:
        read_star(path, chunk_rows=7)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert f"line {k + 1} has" in msg and "15 columns" in msg


def test_bad_value_in_a_late_chunk_names_the_particle_row(particles_dir, tmp_path):
    path, lines, first = _sim_copy(particles_dir, tmp_path)
    values = lines[first + 321].split()
    values[3] = "abc"  # rlnAngleRot of particle row 321
    lines[first + 321] = " ".join(values)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CryoaceInputError, match="rlnAngleRot .* 'abc' at particle 322") as err:  # from 1
        read_star(path, chunk_rows=7)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------------------------
# Extra columns stay in the file
# --------------------------------------------------------------------------------------------

def test_extra_columns_are_read_when_asked(particles_dir, tmp_path):
    path = tmp_path / "six.star"
    shutil.copy(particles_dir / SIX, path)
    table = read_star(path)
    assert "rlnMicrographName" in table.extra_columns and "rlnDefocusU" not in table.extra_columns
    sub = table.subset([138, 5])
    path.write_text(path.read_text().replace("MotionCorr/", "Motion/"))  # the file changes
    with pytest.raises(CryoaceInputError, match="changed") as err:
        _ = sub.extra  # reading the property is what raises
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    fresh = read_star(path)
    assert fresh.extra["rlnMicrographName"].str.startswith("Motion/").all()  # read now, then kept
    shutil.copy(particles_dir / SIX, path)
    assert fresh.extra["rlnMicrographName"].str.startswith("Motion/").all()


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 139, 1000])
@pytest.mark.parametrize("rows", [None, np.arange(2, 139, 2), np.array([100, 3, 57, 3, 0])])
def test_extra_frames_come_in_exact_chunks(particles_dir, chunk_rows, rows):
    """Whatever sizes the file is read in, the extra columns come in the chunks of row_chunks, and
    together they are the whole extra table."""
    table = read_star(particles_dir / SIX)
    if rows is not None:
        table = table.subset(rows)
    chunks = list(table.extra_frames(chunk_rows=chunk_rows))
    assert [(c.index[0], c.index[-1] + 1) for c in chunks] == list(row_chunks(len(table), chunk_rows))
    source = _loop_text(particles_dir / SIX)
    picked = source if rows is None else source.iloc[rows].reset_index(drop=True)
    pd.testing.assert_frame_equal(pd.concat(chunks), picked[table.extra_columns])  # the file's text


def test_one_extra_column_is_read_alone(particles_dir):
    """extra_column reads one column (as numbers where it can) without loading the others, and
    agrees with the whole table of extra columns; a missing column is None."""
    from cryoace.io.starloop import LoopColumns

    table = read_star(particles_dir / SIX)
    subset = table.extra_column("rlnRandomSubset")
    names = table.extra_column("rlnMicrographName")
    assert isinstance(table._extra, LoopColumns)  # still in the file
    assert subset.dtype.kind in "if" and set(np.unique(subset).tolist()) == {1, 2} and len(subset) == len(table)
    assert table.extra_column("rlnNoSuchColumn") is None
    frame = read_star(particles_dir / SIX).extra
    assert np.array_equal(subset, pd.to_numeric(frame["rlnRandomSubset"]).to_numpy())
    assert list(names) == list(frame["rlnMicrographName"])


@pytest.mark.parametrize("rows", [None, np.arange(0, 139, 3), np.array([100, 3, 57, 3, 0])])
def test_write_streams_the_extra_text(particles_dir, tmp_path, rows):
    """Extra columns still in the source file are copied as their text: in order, in chunks, or
    picked in any order."""
    src = particles_dir / SIX
    table = read_star(src)
    if rows is not None:
        table = table.subset(rows)
    write_star(tmp_path / "a.star", table, chunk_rows=7)
    write_star(tmp_path / "b.star", table)
    assert (tmp_path / "a.star").read_text() == (tmp_path / "b.star").read_text()
    source, written = _loop_text(src), _loop_text(tmp_path / "a.star")
    picked = source if rows is None else source.iloc[rows].reset_index(drop=True)
    for col in ("rlnMicrographName", "rlnCoordinateX", "rlnGroupNumber", "rlnOpticsGroup"):
        assert written[col].tolist() == picked[col].tolist(), col
    assert_same_table(table.subset(np.arange(len(table))), read_star(tmp_path / "a.star"))


def test_write_poses_from_a_function_chunk_by_chunk(particles_dir, tmp_path):
    table = read_star(particles_dir / SIM)
    calls = []

    def poses(rows):
        calls.append(rows.copy())
        return Pose(rotmat=torch.eye(3, dtype=torch.float64).expand(len(rows), 3, 3),
                    shift_angst=torch.from_numpy(np.stack([rows, -rows], -1).astype(np.float64)))

    write_star(tmp_path / "p.star", table, pose=poses, chunk_rows=64)
    # exactly the row_chunks blocks (64, 64, ..., 52), not the reader's byte-sized blocks: a pose
    # predictor called per chunk then always runs the same batch shapes
    assert [(c[0], c[-1] + 1, len(c)) for c in calls] == [(a, b, b - a) for a, b in row_chunks(len(table), 64)]
    assert np.array_equal(np.concatenate(calls), np.arange(len(table)))
    back = read_star(tmp_path / "p.star")
    torch.testing.assert_close(back.pose.rotmat, torch.eye(3, dtype=torch.float64).expand(500, 3, 3))
    np.testing.assert_array_equal(back.pose.shift_angst[:, 0].numpy(), np.arange(500))
    torch.testing.assert_close(back.ctf.defocus_u, table.ctf.defocus_u, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Compact storage
# --------------------------------------------------------------------------------------------

def _stored_bytes(table) -> int:
    """Bytes of the per-particle arrays the table holds (broadcast constants count as nothing)."""
    arrays = [table.pixel_size, table.image_indices, table.image_paths.codes]
    arrays += [getattr(table.ctf, f.name) for f in dataclasses.fields(CTFParams)]
    arrays += [getattr(table.pose_angles, f.name) for f in dataclasses.fields(EulerPoses)]
    if table.image_size is not None:
        arrays.append(table.image_size)
    total = 0
    for a in arrays:
        stride = a.stride()[0] if isinstance(a, torch.Tensor) else a.strides[0]
        total += 0 if stride == 0 else (a.nbytes if isinstance(a, np.ndarray) else a.numel() * a.element_size())
    return total


def test_table_is_compact_and_the_dataset_shares_it(particles_dir, tmp_path):
    doc = starfile.read(particles_dir / SIM, always_dict=True)
    n = 20_000
    doc["particles"] = doc["particles"].iloc[np.arange(n) % 500].reset_index(drop=True)
    star = tmp_path / "big.star"
    starfile.write(doc, star)
    for stack in (particles_dir / SIM).parent.glob("*.mrcs"):
        (tmp_path / stack.name).symlink_to(stack)
    table = read_star(star)
    assert len(table) == n
    # 1 B stack code + 4 B index + 12 B defocus U/V/angle + 20 B angles and origins; the rest is constant
    assert _stored_bytes(table) <= 38 * n
    assert table.pixel_size.strides == (0,) and table.ctf.voltage_kv.stride() == (0,)
    assert len(pickle.dumps(table)) < 40 * n + 100_000
    ds = ParticleDataset(table, normalize=False)
    assert ds.table is table and np.shares_memory(ds._stack_codes, table.image_paths.codes)
    batch = ds[[19_999, 3]]
    torch.testing.assert_close(batch.pose.rotmat, table.pose_rows([19_999, 3]).rotmat.float())
    torch.testing.assert_close(table.pose_rows([19_999, 3]).rotmat, table.pose.rotmat[[19_999, 3]])
    half = ds.subset(np.arange(0, n, 2))
    assert len(half) == n // 2 and torch.equal(half[[1]].images, ds[[2]].images)


def test_assigned_image_paths_and_poses_are_stored_compactly(particles_dir):
    table = read_star(particles_dir / SIM)
    table.image_paths = np.array(["/a.mrcs", "/b.mrcs"] * 250, dtype=object)
    assert isinstance(table.image_paths, pd.Categorical) and table.stack_paths == ["/a.mrcs", "/b.mrcs"]
    pose = table.pose
    table.pose = Pose(rotmat=pose.rotmat, shift_angst=pose.shift_angst * 0)
    assert isinstance(table.pose_angles, EulerPoses) and table.pose_angles.shift_x.stride() == (0,)
    torch.testing.assert_close(table.pose.rotmat, pose.rotmat, atol=1e-6, rtol=0)


def test_write_columns_replace_or_add_extra_columns(particles_dir, tmp_path):
    """``columns`` replaces an extra column in place (streamed, chunk by chunk) or adds one; columns
    the table itself represents, or a wrong length, are refused."""
    table = read_star(particles_dir / SIX)
    n = len(table)
    subset = (np.arange(n) % 2 + 1).astype(np.int8)[::-1].copy()
    score = np.linspace(0.0, 1.0, n)
    write_star(tmp_path / "c.star", table, chunk_rows=7, columns={"rlnRandomSubset": subset, "rlnMyScore": score})
    write_star(tmp_path / "plain.star", table)
    labels = list(scan_star(tmp_path / "plain.star")["particles"].labels)
    written = list(scan_star(tmp_path / "c.star")["particles"].labels)
    assert [c for c in written if c != "rlnMyScore"] == labels  # replaced in place
    assert written.index("rlnMyScore") == labels.index("rlnImageName")  # added after the extra columns
    back = starfile.read(tmp_path / "c.star", always_dict=True)["particles"]
    assert back["rlnRandomSubset"].tolist() == subset.tolist()
    np.testing.assert_allclose(back["rlnMyScore"].to_numpy(), score, rtol=1e-11)  # 12 digits
    assert back["rlnMicrographName"].tolist() == _loop_text(particles_dir / SIX)["rlnMicrographName"].tolist()
    with pytest.raises(ValueError, match="rlnDefocusU"):
        write_star(tmp_path / "d.star", table, columns={"rlnDefocusU": score})
    with pytest.raises(ValueError, match="values for"):
        write_star(tmp_path / "d.star", table, columns={"rlnMyScore": score[:-1]})
    assert not (tmp_path / "d.star").exists()
