"""RELION star reading/writing against the real files in tests/data/particles (numbers checked
against the text of the files with an independent little parser)."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cryoace.errors import CryoaceInputError
from cryoace.io.particles import ParticleDataset, read_particles
from cryoace.io.star import read_star, write_star
from cryoace.physics.rotations import euler_relion_to_rotmat


def parse_loop(path: Path, block: str) -> pd.DataFrame:
    """Independent minimal STAR loop parser: the ``data_<block>`` loop as strings (column = label)."""
    lines = Path(path).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"data_{block}")
    labels, rows, i = [], [], start + 1
    while not lines[i].strip().startswith("loop_"):
        i += 1
    i += 1
    while i < len(lines) and lines[i].strip().startswith("_"):
        labels.append(lines[i].split()[0][1:])
        i += 1
    while i < len(lines):
        s = lines[i].strip()
        if s.startswith("data_") or s.startswith("# version"):
            break
        if s and not s.startswith("#"):
            rows.append(s.split())
        i += 1
    return pd.DataFrame(rows, columns=labels)


def num(df, col):
    return df[col].astype(float).to_numpy()


def F32(x: float) -> float:
    """``x`` as the table stores it (float32)."""
    return float(np.float32(x))


R31 = "relion31_cryodrgn"

# file, count, pixel size of row 0, has_ctf, has_pose, image size (None = not in file)
ALL_STARS = [
    ("empiar10076_cryodrgn/empiar_10076_7.star", 7, 5.0 / 38168 * 1e4, True, False, None),
    (f"{R31}/FinalRefinement-OriginalParticles-PfCRT.star", 5, 1.035, True, True, None),
    (f"{R31}/relion31.star", 5, 2.806, True, True, 256),
    (f"{R31}/relion31.v2.star", 5, 2.806, True, True, 256),
    (f"{R31}/relion31.6opticsgroups.star", 139, None, True, True, 196),
    (f"{R31}/relion5.star", 17, 0.89, True, True, 448),
    ("relion_project_aspire/rln_proj_64_centered.star", 4, 1.0, False, True, 64),
    ("relion_project_aspire/rln_proj_64_shifted.star", 4, 1.0, False, True, 64),
    ("sim_aspire_spike_L64_noctf_clean/particles.star", 20, 3.0, False, True, 64),
    ("sim_aspire_spike_L64_ctf_clean/particles.star", 100, 3.0, True, True, 64),
    ("sim_aspire_spike_L64_ctf_snr0.1/particles.star", 500, 3.0, True, True, 64),
    ("trpv1_cryojax/trpv1_small_stack.star", 10, 4.88, True, True, 48),
]


@pytest.mark.parametrize("name,count,psize,has_ctf,has_pose,box", ALL_STARS)
def test_read_every_star(particles_dir, name, count, psize, has_ctf, has_pose, box):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PfCRT has no amplitude contrast (RELION default, warned)
        table = read_star(particles_dir / name)
    assert len(table) == count
    if psize is not None:
        np.testing.assert_allclose(table.pixel_size, psize, rtol=1e-12)
    assert table.has_ctf is has_ctf
    assert (table.pose is not None) is has_pose
    if box is None:
        assert table.image_size is None
    else:
        assert (table.image_size == box).all()
    assert table.image_paths is not None and len(table.image_paths) == count
    assert all(Path(p).is_absolute() for p in table.stack_paths)
    # stored compactly: CTF in float32, poses as float32 angles; table.pose computes float64 matrices
    assert table.ctf.defocus_u.dtype == torch.float32 and table.ctf.defocus_u.shape == (count,)
    if has_pose:
        assert table.pose.rotmat.shape == (count, 3, 3) and table.pose.rotmat.dtype == torch.float64


def test_empiar_relion30_pixel_size_and_ctf(particles_dir):
    path = particles_dir / "empiar10076_cryodrgn/empiar_10076_7.star"
    table = read_star(path)
    np.testing.assert_allclose(table.pixel_size, 1.31, atol=1e-4)  # 5 µm / 38168 × 1e4
    text = parse_loop(path, "")
    np.testing.assert_allclose(table.ctf.defocus_u.numpy(), num(text, "rlnDefocusU"))
    np.testing.assert_allclose(table.ctf.defocus_v.numpy(), num(text, "rlnDefocusV"))
    np.testing.assert_allclose(table.ctf.defocus_angle.numpy(), np.deg2rad(num(text, "rlnDefocusAngle")))
    assert table.ctf.defocus_u[2].item() == F32(15150.7) and table.ctf.defocus_v[2].item() == 14766.0
    np.testing.assert_allclose(table.ctf.voltage_kv.numpy(), 300.0)
    np.testing.assert_allclose(table.ctf.cs_mm.numpy(), 2.7)
    np.testing.assert_allclose(table.ctf.amplitude_contrast.numpy(), 0.07)
    assert (table.ctf.phase_shift == 0).all() and (table.ctf.bfactor == 0).all()
    assert list(table.image_indices) == list(range(7))
    assert table.stack_paths == [str(particles_dir / "empiar10076_cryodrgn/empiar_10076_7.mrc")]
    assert "rlnMicrographName" in table.extra.columns and table.optics is None


@pytest.mark.parametrize("name", ["relion31.star", "relion31.v2.star"])
def test_relion31_against_text(particles_dir, name):
    """Both files (optics first / particles first) give the same numbers as their text."""
    path = particles_dir / R31 / name
    table = read_star(path)
    text = parse_loop(path, "particles")
    np.testing.assert_allclose(table.pixel_size, 2.806)
    np.testing.assert_allclose(table.ctf.defocus_u.numpy(), num(text, "rlnDefocusU"))
    np.testing.assert_allclose(table.ctf.defocus_v.numpy(), num(text, "rlnDefocusV"))
    np.testing.assert_allclose(table.ctf.defocus_angle.numpy(), np.deg2rad(num(text, "rlnDefocusAngle")))
    assert table.ctf.defocus_u[0].item() == F32(13108.082418)
    np.testing.assert_allclose(table.ctf.defocus_angle[0].item(), np.deg2rad(-160.39))
    np.testing.assert_allclose(table.ctf.cs_mm.numpy(), 0.01)
    np.testing.assert_allclose(table.ctf.amplitude_contrast.numpy(), 0.1)
    np.testing.assert_allclose(table.ctf.voltage_kv.numpy(), 300.0)
    rot = torch.from_numpy(np.deg2rad(num(text, "rlnAngleRot")))
    tilt = torch.from_numpy(np.deg2rad(num(text, "rlnAngleTilt")))
    psi = torch.from_numpy(np.deg2rad(num(text, "rlnAnglePsi")))
    torch.testing.assert_close(table.pose.rotmat, euler_relion_to_rotmat(rot, tilt, psi), atol=1e-6, rtol=0)
    shift = np.stack([num(text, "rlnOriginXAngst"), num(text, "rlnOriginYAngst")], -1)
    np.testing.assert_allclose(table.pose.shift_angst.numpy(), shift)
    assert table.stack_paths == [str(particles_dir / R31 / "relion31.mrcs")]
    assert list(table.image_indices) == [0, 1, 2, 3, 4]
    assert "rlnImageOriginalName" in table.extra.columns
    assert "rlnDefocusU" not in table.extra.columns  # represented by table.ctf


def test_six_optics_groups(particles_dir):
    path = particles_dir / R31 / "relion31.6opticsgroups.star"
    table = read_star(path)
    optics = parse_loop(path, "optics").set_index("rlnOpticsGroup")
    parts = parse_loop(path, "particles")
    assert len(table) == 139 and len(optics) == 6 and len(table.optics) == 6
    groups = parts["rlnOpticsGroup"].to_numpy()
    assert set(groups) == {"1", "2", "3", "4", "5", "6"}
    for col, field in [("rlnImagePixelSize", None), ("rlnVoltage", "voltage_kv"),
                       ("rlnSphericalAberration", "cs_mm"), ("rlnAmplitudeContrast", "amplitude_contrast")]:
        expected = optics.loc[groups, col].astype(float).to_numpy()
        got = table.pixel_size if field is None else getattr(table.ctf, field).numpy()
        np.testing.assert_allclose(got, expected)
    # the groups really differ: 1.24 / 1.25 Å, Cs 2.6 in group 4, 200 kV everywhere
    assert set(np.round(table.pixel_size, 3)) == {1.24, 1.25}
    assert set(np.round(table.ctf.cs_mm.double().numpy(), 3)) == {2.6, 2.7}
    np.testing.assert_allclose(table.ctf.voltage_kv.numpy(), 200.0)
    np.testing.assert_allclose(table.ctf.defocus_u.numpy(), num(parts, "rlnDefocusU"))
    np.testing.assert_allclose(table.ctf.phase_shift.numpy(), np.deg2rad(num(parts, "rlnPhaseShift")))
    shift = np.stack([num(parts, "rlnOriginXAngst"), num(parts, "rlnOriginYAngst")], -1)
    np.testing.assert_allclose(table.pose.shift_angst.numpy(), shift)
    assert (table.image_size == 196).all()
    assert table.image_indices[0] == 2  # 3@Polish/job520/Micrographs/0003_shiny.mrcs
    assert table.image_paths[0].endswith("Polish/job520/Micrographs/0003_shiny.mrcs")


def test_relion5_and_trpv1_ctf_spot_checks(particles_dir):
    t5 = read_star(particles_dir / R31 / "relion5.star")
    np.testing.assert_allclose(t5.pixel_size, 0.89)
    np.testing.assert_allclose(t5.ctf.voltage_kv.numpy(), 100.0)
    np.testing.assert_allclose(t5.ctf.cs_mm.numpy(), 1.6)
    assert t5.ctf.defocus_u[0].item() == F32(11949.061330) and t5.ctf.defocus_v[1].item() == F32(11814.936842)
    np.testing.assert_allclose(t5.ctf.defocus_angle[0].item(), np.deg2rad(49.059993))
    np.testing.assert_allclose(t5.pose.shift_angst[1].numpy(), [1.259694, 2.626956])
    assert len(t5.stack_paths) == 2  # toy_images_a / toy_images_b
    assert "rlnOddZernike" in t5.optics.columns

    path = particles_dir / "trpv1_cryojax/trpv1_small_stack.star"
    tt = read_star(path)
    text = parse_loop(path, "particles")
    np.testing.assert_allclose(tt.pixel_size, 4.88)
    np.testing.assert_allclose(tt.ctf.cs_mm.numpy(), 2.0)
    np.testing.assert_allclose(tt.ctf.defocus_u.numpy(), num(text, "rlnDefocusU"))
    np.testing.assert_allclose(tt.ctf.defocus_v.numpy(), 15222.730469)
    np.testing.assert_allclose(tt.ctf.defocus_angle.numpy(), np.deg2rad(53.749996))
    shift = np.stack([num(text, "rlnOriginXAngst"), num(text, "rlnOriginYAngst")], -1)
    np.testing.assert_allclose(tt.pose.shift_angst.numpy(), shift)
    assert tt.pose.shift_angst[0, 0].item() == F32(-8.149219)
    assert (tt.extra["rlnOpticsGroup"] == 7).all()


def test_relion30_origins_in_pixels_and_missing_amplitude_contrast(particles_dir):
    path = particles_dir / R31 / "FinalRefinement-OriginalParticles-PfCRT.star"
    with pytest.warns(UserWarning, match="rlnAmplitudeContrast"):
        table = read_star(path)
    text = parse_loop(path, "images")
    np.testing.assert_allclose(table.pixel_size, 1.035)  # 1.035 µm / 10000 × 1e4
    shift_px = np.stack([num(text, "rlnOriginX"), num(text, "rlnOriginY")], -1)
    np.testing.assert_allclose(table.pose.shift_angst.numpy(), shift_px * 1.035)
    np.testing.assert_allclose(table.ctf.amplitude_contrast.numpy(), 0.0)  # RELION's CTF::read default
    np.testing.assert_allclose(table.ctf.cs_mm.numpy(), 0.001)
    np.testing.assert_allclose(table.ctf.defocus_v.numpy(), num(text, "rlnDefocusV"))


def test_relion31_origins_in_pixels(particles_dir):
    """rln_proj_64_shifted is a 3.1 file with rlnOriginX/Y in pixels: converted with the optics pixel size."""
    path = particles_dir / "relion_project_aspire/rln_proj_64_shifted.star"
    table = read_star(path)
    expected = np.array([[6, 10], [10, -5], [-8, 11], [-13, -3]], dtype=float)
    np.testing.assert_allclose(table.pose.shift_angst.numpy(), expected * 1.0)
    doubled = read_star(path, pixel_size=2.0)
    np.testing.assert_allclose(doubled.pose.shift_angst.numpy(), expected * 2.0)
    np.testing.assert_allclose(doubled.pixel_size, 2.0)


def test_origin_sign_on_relion_project_images(particles_dir):
    """RELION's shifted stack is the centred one translated by −origin (docs/conventions.md §1)."""
    d = particles_dir / "relion_project_aspire"
    centred = ParticleDataset(read_star(d / "rln_proj_64_centered.star"), normalize=False)
    shifted = ParticleDataset(read_star(d / "rln_proj_64_shifted.star"), normalize=False)
    a, b = centred[:], shifted[:]
    torch.testing.assert_close(a.pose.rotmat, b.pose.rotmat)
    for i in range(4):
        tx, ty = (b.pose.shift_angst[i] / b.pixel_size[i]).round().long().tolist()
        back = torch.roll(b.images[i], shifts=(ty, tx), dims=(0, 1))  # translate by +origin
        torch.testing.assert_close(back, a.images[i], atol=1e-7, rtol=0)


@pytest.mark.parametrize("name,pixel_size", [("relion_project_aspire/rln_proj_64.star", 1.0),
                                             ("relion_project_aspire/rln_proj_64_centered.star", None),
                                             ("sim_aspire_spike_L64_noctf_clean/particles.star", None)])
def test_angles_match_projection_images(particles_dir, common_lines, name, pixel_size):
    """Angles → R reproduce the common lines of relion_project / ASPIRE images; Rᵀ does not."""
    ds = ParticleDataset(read_star(particles_dir / name, pixel_size=pixel_size), normalize=False)
    batch = ds[:]
    r = batch.pose.rotmat.double().numpy()
    good = common_lines(r, batch.images.numpy())
    bad = common_lines(r.transpose(0, 2, 1), batch.images.numpy())
    assert good > 0.95 and bad < good - 0.04


def test_no_ctf_files(particles_dir):
    for name in ["sim_aspire_spike_L64_noctf_clean/particles.star", "relion_project_aspire/rln_proj_64_centered.star"]:
        table = read_star(particles_dir / name)
        assert not table.has_ctf
        # represented as the identically-1 CTF: w = 1, no defocus, no Cs, no phase, no B
        np.testing.assert_allclose(table.ctf.amplitude_contrast.numpy(), 1.0)
        for field in ("defocus_u", "defocus_v", "cs_mm", "phase_shift", "bfactor"):
            assert (getattr(table.ctf, field) == 0).all()
        assert (table.ctf.voltage_kv > 0).all()


def test_no_pixel_size_is_an_error(particles_dir):
    path = particles_dir / "relion_project_aspire/rln_proj_64.star"
    with pytest.raises(CryoaceInputError, match="no pixel size") as err:
        read_star(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert len(read_star(path, pixel_size=1.0)) == 5


# --------------------------------------------------------------------------------------------
# Image paths
# --------------------------------------------------------------------------------------------

def test_datadir_lookup(particles_dir, tmp_path):
    src = particles_dir / R31 / "relion31.v2.star"
    star = tmp_path / "moved.star"
    shutil.copy(src, star)
    plain = read_star(star)
    assert plain.stack_paths == [str(tmp_path / "relion31.mrcs")]
    with pytest.raises(CryoaceInputError, match="not found") as err:
        ParticleDataset(plain)
    assert str(tmp_path / "relion31.mrcs") in str(err.value)
    table = read_star(star, datadir=particles_dir / R31)
    assert table.stack_paths == [str(particles_dir / R31 / "relion31.mrcs")]
    assert len(ParticleDataset(table, normalize=False)[:].images) == 5


def test_trpv1_missing_stack_and_remaps(particles_dir, tmp_path):
    d = particles_dir / "trpv1_cryojax"
    star = d / "trpv1_small_stack.star"
    with pytest.raises(CryoaceInputError) as err:
        ParticleDataset(read_star(star))
    msg = str(err.value)
    assert "batch_0_restacked.mrc" in msg and "not found" in msg and str(star) in msg
    # remap by basename
    table = read_star(star, stack_map={"batch_0_restacked.mrc": d / "trpv1_small_stack.mrcs"})
    ds = ParticleDataset(table, normalize=False)
    assert ds[:].images.shape == (10, 48, 48)
    # or a datadir that holds a file of that name
    (tmp_path / "batch_0_restacked.mrc").symlink_to(d / "trpv1_small_stack.mrcs")
    table2 = read_star(star, datadir=tmp_path)
    assert table2.stack_paths == [str(tmp_path / "batch_0_restacked.mrc")]
    torch.testing.assert_close(ParticleDataset(table2, normalize=False)[:].images, ds[:].images)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def assert_tables_equal(a, b, atol=1e-9):
    assert len(a) == len(b)
    np.testing.assert_allclose(a.pixel_size, b.pixel_size, rtol=1e-11)  # written with 12 digits
    assert a.has_ctf == b.has_ctf
    for f in ("defocus_u", "defocus_v", "defocus_angle", "voltage_kv", "cs_mm", "amplitude_contrast",
              "phase_shift", "bfactor"):
        torch.testing.assert_close(getattr(a.ctf, f), getattr(b.ctf, f), atol=atol, rtol=1e-11)
    assert (a.pose is None) == (b.pose is None)
    if a.pose is not None:
        torch.testing.assert_close(a.pose.rotmat, b.pose.rotmat, atol=1e-9, rtol=0)
        torch.testing.assert_close(a.pose.shift_angst, b.pose.shift_angst, atol=atol, rtol=1e-11)
    if a.image_paths is None:
        assert b.image_paths is None
    else:
        assert list(a.image_paths) == list(b.image_paths)
        assert list(a.image_indices) == list(b.image_indices)
    if a.image_size is not None:
        assert list(a.image_size) == list(b.image_size)


@pytest.mark.parametrize("name", [f"{R31}/relion31.v2.star", f"{R31}/relion31.6opticsgroups.star",
                                  f"{R31}/relion5.star", "empiar10076_cryodrgn/empiar_10076_7.star",
                                  "trpv1_cryojax/trpv1_small_stack.star",
                                  "sim_aspire_spike_L64_noctf_clean/particles.star",
                                  f"{R31}/FinalRefinement-OriginalParticles-PfCRT.star"])
def test_write_read_round_trip(particles_dir, tmp_path, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = read_star(particles_dir / name)
    out = tmp_path / "sub" / "out.star"
    write_star(out, table)
    assert not [p for p in out.parent.iterdir() if p.name != "out.star"]  # atomic: no temp left
    back = read_star(out)
    assert_tables_equal(table, back)
    # extra columns survive with their values
    for col in table.extra.columns:
        assert col in back.extra.columns, col
        left, right = table.extra[col].to_numpy(), back.extra[col].to_numpy()
        if pd.api.types.is_numeric_dtype(table.extra[col]):
            np.testing.assert_allclose(left.astype(float), right.astype(float), rtol=1e-10)
        else:
            assert list(map(str, left)) == list(map(str, right))
    # the written file is RELION 3.1: optics + particles with Å origins and degree angles
    text = out.read_text()
    assert "data_optics" in text and "data_particles" in text
    if table.pose is not None:
        assert "_rlnOriginXAngst" in text and "_rlnAngleTilt" in text and "_rlnOriginX\t" not in text


def test_write_keeps_optics_table_and_regenerates_when_changed(particles_dir, tmp_path):
    table = read_star(particles_dir / R31 / "relion31.6opticsgroups.star")
    write_star(tmp_path / "a.star", table)
    back = read_star(tmp_path / "a.star")
    assert "rlnMagMat00" in back.optics.columns and len(back.optics) == 6  # original optics reused
    # a subset and a new pixel size: optics regenerated from the particles' values
    sub = table.subset(np.arange(0, 139, 10))
    sub.pixel_size = sub.pixel_size * 2
    write_star(tmp_path / "b.star", sub)
    back = read_star(tmp_path / "b.star")
    assert_tables_equal(sub, back)
    assert len(back.optics) == len({(p, c) for p, c in zip(sub.pixel_size, sub.ctf.cs_mm.tolist(), strict=True)})


def test_write_image_paths_relative_to_the_written_file(particles_dir, tmp_path):
    """Names are written as RELION resolves them, relative to the new file's folder (never absolute
    paths of this machine unless the file read had them)."""
    table = read_star(particles_dir / R31 / "relion31.v2.star")
    write_star(tmp_path / "x.star", table)
    rel = os.path.relpath(particles_dir / R31 / "relion31.mrcs", tmp_path)
    assert rel.startswith("..") and f"000001@{rel}" in (tmp_path / "x.star").read_text()
    assert read_star(tmp_path / "x.star").stack_paths == table.stack_paths
    moved = table.remap_stacks({"relion31.mrcs": tmp_path / "stacks" / "r.mrcs"})
    write_star(tmp_path / "y.star", moved)
    assert "000005@stacks/r.mrcs" in (tmp_path / "y.star").read_text()
    assert read_star(tmp_path / "y.star").stack_paths == [str(tmp_path / "stacks" / "r.mrcs")]


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def _one_line_naming(err, path):
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(CryoaceInputError, match="not found") as err:
        read_star(tmp_path / "nope.star")
    _one_line_naming(err, tmp_path / "nope.star")
    bad = tmp_path / "bad.star"
    bad.write_text("data_particles\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n1@a.mrcs 100 7 8 9\n")
    with pytest.raises(CryoaceInputError) as err:
        read_star(bad)
    _one_line_naming(err, bad)
    empty = tmp_path / "empty.star"
    empty.write_text("# nothing here\n")
    with pytest.raises(CryoaceInputError) as err:
        read_star(empty)
    _one_line_naming(err, empty)


def _edit(src: Path, dst: Path, old: str, new: str) -> Path:
    text = src.read_text()
    assert old in text
    dst.write_text(text.replace(old, new))
    return dst


def test_zero_pixel_size(particles_dir, tmp_path):
    src = particles_dir / "sim_aspire_spike_L64_ctf_clean/particles.star"
    path = _edit(src, tmp_path / "p.star", "1 opticsGroup1 3.0 2.7", "1 opticsGroup1 0.0 2.7")
    with pytest.raises(CryoaceInputError, match="pixel size") as err:
        read_star(path)
    _one_line_naming(err, path)


def test_unknown_optics_group_and_bad_values(particles_dir, tmp_path):
    src = particles_dir / "trpv1_cryojax/trpv1_small_stack.star"
    path = _edit(src, tmp_path / "g.star", "0.000000 0.000000 7 2 1\n", "0.000000 0.000000 8 2 1\n")
    with pytest.raises(CryoaceInputError, match="optics group 8") as err:
        read_star(path)
    _one_line_naming(err, path)
    path = _edit(src, tmp_path / "v.star", "14657.509766", "abc")
    with pytest.raises(CryoaceInputError, match="rlnDefocusU") as err:
        read_star(path)
    _one_line_naming(err, path)
    path = _edit(src, tmp_path / "i.star", "000003@", "0@")
    with pytest.raises(CryoaceInputError, match="rlnImageName") as err:
        read_star(path)
    _one_line_naming(err, path)


def test_missing_image_name_column(particles_dir, tmp_path):
    """Metadata without rlnImageName reads (no images), but a dataset needs the images."""
    table = read_star(particles_dir / "trpv1_cryojax/trpv1_small_stack.star")
    table.image_paths = table.image_indices = None
    write_star(tmp_path / "noimg.star", table)
    back = read_star(tmp_path / "noimg.star")
    assert back.image_paths is None and len(back) == 10
    with pytest.raises(CryoaceInputError, match="rlnImageName") as err:
        ParticleDataset(back)
    _one_line_naming(err, tmp_path / "noimg.star")


def test_read_particles_dispatch(particles_dir, tmp_path):
    assert len(read_particles(particles_dir / R31 / "relion31.v2.star")) == 5
    assert len(read_particles(particles_dir / "empiar10076_cryodrgn/empiar_10076_7.cs")) == 7
    stack = read_particles(particles_dir / "trpv1_cryojax/trpv1_small_stack.mrcs")
    assert len(stack) == 10 and stack.pose is None and not stack.has_ctf
    np.testing.assert_allclose(stack.pixel_size, 4.88, rtol=1e-6)  # from the MRC header
    other = tmp_path / "particles.txt"
    other.write_text("x")
    with pytest.raises(CryoaceInputError, match="unsupported") as err:
        read_particles(other)
    _one_line_naming(err, other)
