"""cryoSPARC .cs reading against the real files, and agreement with the RELION star of the same particles."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from cryoace.errors import CryoaceInputError
from cryoace.io.cryosparc import read_cs
from cryoace.io.particles import ParticleDataset
from cryoace.io.star import read_star, write_star

CS = "cryosparc_cryodrgn"
EMPIAR = "empiar10076_cryodrgn"


def rodrigues(v: np.ndarray) -> np.ndarray:
    """Active rotation matrix exp([v]x) = I + sin t K + (1 - cos t) K^2 (independent of cryoace)."""
    theta = np.linalg.norm(v)
    k = v / theta
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * kx + (1 - np.cos(theta)) * kx @ kx


@pytest.mark.parametrize("name,count,psize,box,has_pose", [
    (f"{CS}/cryosparc_J2_particles_exported.cs", 22, 1.3450001, 300, False),
    (f"{CS}/cryosparc_P12_J24_001_particles.cs", 2019, 2.95, 180, True),
    (f"{EMPIAR}/empiar_10076_7.cs", 7, 1.3099979, 320, False),
])
def test_read_every_cs(particles_dir, name, count, psize, box, has_pose):
    raw = np.load(particles_dir / name)
    table = read_cs(particles_dir / name)
    assert len(table) == count
    np.testing.assert_allclose(table.pixel_size, psize, rtol=1e-6)
    assert (table.image_size == box).all()
    assert (table.pose is not None) is has_pose
    assert table.has_ctf
    # CTF fields copied in RELION units (angles stay radians)
    np.testing.assert_allclose(table.ctf.defocus_u.numpy(), raw["ctf/df1_A"])
    np.testing.assert_allclose(table.ctf.defocus_v.numpy(), raw["ctf/df2_A"])
    np.testing.assert_allclose(table.ctf.defocus_angle.numpy(), raw["ctf/df_angle_rad"])
    np.testing.assert_allclose(table.ctf.voltage_kv.numpy(), raw["ctf/accel_kv"])
    np.testing.assert_allclose(table.ctf.cs_mm.numpy(), raw["ctf/cs_mm"])
    np.testing.assert_allclose(table.ctf.amplitude_contrast.numpy(), raw["ctf/amp_contrast"])
    np.testing.assert_allclose(table.ctf.phase_shift.numpy(), raw["ctf/phase_shift_rad"])
    np.testing.assert_array_equal(table.image_indices, raw["blob/idx"])
    assert "uid" in table.extra.columns and "blob/sign" in table.extra.columns
    assert "ctf/df1_A" not in table.extra.columns


def test_paths_prefix_and_project_dir(particles_dir):
    j2 = read_cs(particles_dir / CS / "cryosparc_J2_particles_exported.cs")
    assert j2.image_paths[0] == str(particles_dir / CS /
                                    "J1/imported/000090334788266266069_18jam15b_0345_ali_DW.mrcs")
    assert not any(">" in p for p in j2.stack_paths)
    p12 = read_cs(particles_dir / CS / "cryosparc_P12_J24_001_particles.cs")
    assert p12.image_paths[0].endswith(
        "J19/extract/20150917_05196_DNA-TET-25k-DE20_raw.region_000.sum-all_003-072_particles.mrc")
    assert len(p12.stack_paths) > 1


def test_pose_convention(particles_dir):
    """R = Rodrigues(pose)ᵀ (cryoDRGN parse_pose_csparc / pyem csparc2star); shift px, RELION's sign."""
    path = particles_dir / CS / "cryosparc_P12_J24_001_particles.cs"
    raw = np.load(path)
    table = read_cs(path)
    for i in (0, 1, 1000, 2018):
        expected = rodrigues(raw["alignments3D/pose"][i].astype(np.float64)).T
        np.testing.assert_allclose(table.pose.rotmat[i].numpy(), expected, atol=1e-6)  # float32 angles
    np.testing.assert_allclose(table.pose.shift_angst.numpy(), raw["alignments3D/shift"] * 2.95, rtol=1e-6)
    np.testing.assert_allclose(table.pose.shift_angst[0].numpy(), [11.334375 * 2.95, -1.828125 * 2.95],
                               rtol=1e-6)
    r = table.pose.rotmat
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(3, dtype=r.dtype).expand_as(r))
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(len(r), dtype=r.dtype))


def test_empiar_cs_agrees_with_star(particles_dir):
    cs = read_cs(particles_dir / EMPIAR / "empiar_10076_7.cs")
    star = read_star(particles_dir / EMPIAR / "empiar_10076_7.star")
    np.testing.assert_allclose(cs.pixel_size, star.pixel_size, rtol=1e-6)
    np.testing.assert_allclose(cs.pixel_size, 1.31, atol=1e-4)
    for f in ("defocus_u", "defocus_v", "defocus_angle", "voltage_kv", "cs_mm", "amplitude_contrast",
              "phase_shift", "bfactor"):
        np.testing.assert_allclose(getattr(cs.ctf, f).numpy(), getattr(star.ctf, f).numpy(),
                                   rtol=1e-6, atol=1e-7, err_msg=f)
    np.testing.assert_allclose(cs.ctf.defocus_angle.numpy(), np.deg2rad(5.28), rtol=1e-6)
    assert list(cs.image_paths) == list(star.image_paths)
    assert list(cs.image_indices) == list(star.image_indices)
    a = ParticleDataset(cs, normalize=False)[[6, 0, 3]]
    b = ParticleDataset(star, normalize=False)[[6, 0, 3]]
    torch.testing.assert_close(a.images, b.images)


def test_cs_to_star_round_trip(particles_dir, tmp_path):
    table = read_cs(particles_dir / CS / "cryosparc_P12_J24_001_particles.cs")
    write_star(tmp_path / "p12.star", table)
    back = read_star(tmp_path / "p12.star")
    assert len(back) == 2019 and len(back.optics) == 1
    torch.testing.assert_close(back.pose.rotmat, table.pose.rotmat, atol=1e-9, rtol=0)
    torch.testing.assert_close(back.pose.shift_angst, table.pose.shift_angst, atol=1e-9, rtol=1e-10)
    torch.testing.assert_close(back.ctf.defocus_angle, table.ctf.defocus_angle, atol=1e-9, rtol=1e-10)
    assert list(back.image_paths) == list(table.image_paths)
    np.testing.assert_array_equal(back.extra["uid"].to_numpy(np.uint64), table.extra["uid"].to_numpy())


def test_datadir_and_prefix(particles_dir, tmp_path):
    src = particles_dir / EMPIAR / "empiar_10076_7.cs"
    raw = np.load(src)
    moved = tmp_path / "J5" / "particles.cs"
    moved.parent.mkdir()
    shutil.copy(src, moved)
    with pytest.raises(CryoaceInputError, match="not found"):
        ParticleDataset(read_cs(moved))
    table = read_cs(moved, datadir=particles_dir / EMPIAR)
    assert table.stack_paths == [str(particles_dir / EMPIAR / "empiar_10076_7.mrc")]
    # '>J1/imported/<name>' resolves by basename in datadir
    edited = raw.copy()
    new_dtype = edited.dtype.descr
    new_dtype = [(n, "|S80") if n == "blob/path" else (n, *rest) for n, *rest in new_dtype]
    edited = edited.astype(new_dtype)
    edited["blob/path"] = b">J1/imported/empiar_10076_7.mrc"
    with open(tmp_path / "prefixed.cs", "wb") as fh:
        np.save(fh, edited)
    table = read_cs(tmp_path / "prefixed.cs", datadir=particles_dir / EMPIAR)
    assert table.stack_paths == [str(particles_dir / EMPIAR / "empiar_10076_7.mrc")]
    # project layout: <project>/J5/particles.cs with paths relative to <project>
    (tmp_path / "J1" / "imported").mkdir(parents=True)
    (tmp_path / "J1" / "imported" / "empiar_10076_7.mrc").symlink_to(particles_dir / EMPIAR / "empiar_10076_7.mrc")
    with open(moved, "wb") as fh:
        edited["blob/path"] = b"J1/imported/empiar_10076_7.mrc"
        np.save(fh, edited)
    table = read_cs(moved)
    assert table.stack_paths == [str(tmp_path / "J1/imported/empiar_10076_7.mrc")]
    assert len(ParticleDataset(table, normalize=False)[:].images) == 7


def _save(path, arr):
    with open(path, "wb") as fh:
        np.save(fh, arr)
    return path


def test_bad_cs_files(particles_dir, tmp_path):
    raw = np.load(particles_dir / EMPIAR / "empiar_10076_7.cs")
    garbage = tmp_path / "garbage.cs"
    garbage.write_bytes(b"this is not numpy")
    cases = [
        (garbage, "not a readable"),
        (_save(tmp_path / "plain.cs", np.zeros((3, 4))), "structured"),
        (_save(tmp_path / "nopsize.cs", raw[[n for n in raw.dtype.names if n != "blob/psize_A"]]),
         "blob/psize_A"),
        (tmp_path / "missing.cs", "not found"),
    ]
    zero = raw.copy()
    zero["blob/psize_A"] = 0.0
    cases.append((_save(tmp_path / "zero.cs", zero), "pixel size"))
    noidx = raw[[n for n in raw.dtype.names if n != "blob/idx"]]
    cases.append((_save(tmp_path / "noidx.cs", noidx), "blob/idx"))
    for path, pattern in cases:
        with pytest.raises(CryoaceInputError, match=pattern) as err:
            read_cs(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    # an explicit pixel size rescues a file without one
    assert len(read_cs(tmp_path / "nopsize.cs", pixel_size=1.31)) == 7
