"""rlnImageName in written star files: relative to the written file's folder as RELION resolves them,
so a project moved (or copied to another machine) with its data still reads; absolute only where the
file read had absolute names."""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch

from cryoace.io.cryodrgn import table_from_stack
from cryoace.io.particles import ParticleDataset
from cryoace.io.star import read_star, write_star
from cryoace.train.predict import write_poses_star
from cryoace.types import Pose


def _names(star) -> list[str]:
    text = star.read_text().splitlines()
    return sorted({line.split()[0].split("@", 1)[1] for line in text if "@" in line})


def test_moved_project_still_reads(particles_dir, tmp_path):
    project = tmp_path / "here" / "project"
    (project / "data").mkdir(parents=True)
    shutil.copy(particles_dir / "cryodrgn_hand" / "hand.mrcs", project / "data" / "hand.mrcs")
    write_star(project / "particles.star", table_from_stack(project / "data" / "hand.mrcs", pixel_size=2.0))
    assert _names(project / "particles.star") == ["data/hand.mrcs"]
    table = read_star(project / "particles.star")
    pose = Pose(rotmat=torch.eye(3, dtype=torch.float64).expand(100, 3, 3).clone(),
                shift_angst=torch.zeros(100, 2, dtype=torch.float64))
    poses_star = project / "runs" / "run1" / "poses.star"
    write_poses_star(poses_star, table, pose)  # what reconstruct and predict-poses write
    assert _names(poses_star) == ["../../data/hand.mrcs"]
    before = ParticleDataset(read_star(poses_star), normalize=False)[[0, 57, 99]].images

    moved = tmp_path / "elsewhere" / "proj2"
    shutil.copytree(project, moved)
    shutil.rmtree(tmp_path / "here")
    again = read_star(moved / "runs" / "run1" / "poses.star")
    assert again.stack_paths == [os.path.normpath(moved / "data" / "hand.mrcs")]
    after = ParticleDataset(again, normalize=False)[[0, 57, 99]].images
    np.testing.assert_array_equal(after.numpy(), before.numpy())


def test_absolute_names_stay_absolute_and_subsets_keep_that(particles_dir, tmp_path):
    stack = particles_dir / "cryodrgn_hand" / "hand.mrcs"
    star = tmp_path / "in" / "abs.star"
    star.parent.mkdir()
    rows = "\n".join(f"{i:06d}@{stack}\t2.0" for i in range(1, 11))
    star.write_text("data_particles\nloop_\n_rlnImageName #1\n_rlnImagePixelSize #2\n" + rows + "\n")
    table = read_star(star)
    assert table.absolute_stacks == {str(stack)}
    out = tmp_path / "out" / "deep" / "poses.star"
    out.parent.mkdir(parents=True)
    write_star(out, table.subset([3, 1]))
    assert _names(out) == [str(stack)]
    # the same stack named relatively in another file is written relative
    rel = tmp_path / "in" / "rel.star"
    rel.write_text(star.read_text().replace(str(stack), os.path.relpath(stack, rel.parent)))
    write_star(out, read_star(rel))
    assert _names(out) == [os.path.relpath(stack, out.parent)]
