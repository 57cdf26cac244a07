"""Writing predicted poses: a pose source is run over every chunk of rows first (spooled to an
anonymous temporary file, exactly), and only then is the star file written — so large prediction
temporaries never interleave with the writer's text — with nothing left behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoace.io.columns import row_chunks
from cryoace.io.star import read_star
from cryoace.physics.rotations import random_rotmat
from cryoace.train.predict import spooled_poses, write_poses_star
from cryoace.types import Pose

SIM = "sim_aspire_spike_L64_ctf_snr0.1/particles.star"


def _truth(n: int, seed: int = 0) -> Pose:
    g = torch.Generator().manual_seed(seed)
    return Pose(rotmat=random_rotmat(n, g, torch.float64),
                shift_angst=torch.randn(n, 2, generator=g, dtype=torch.float64))


def test_spooled_poses_round_trip_exactly_in_row_chunks(tmp_path):
    truth = _truth(103)
    calls = []

    def source(rows):
        calls.append(rows.copy())
        return Pose(rotmat=truth.rotmat[rows], shift_angst=truth.shift_angst[rows])

    with spooled_poses(source, 103, chunk_rows=10, directory=tmp_path) as read:
        assert [(c[0], c[-1] + 1) for c in calls] == list(row_chunks(103, 10))  # all run before any read
        assert list(tmp_path.iterdir()) == []  # anonymous: nothing to clean up, even after a crash
        back = read(np.arange(37, 64))
        assert torch.equal(back.rotmat, truth.rotmat[37:64]) and torch.equal(back.shift_angst, truth.shift_angst[37:64])
        assert torch.equal(read(np.arange(0, 103)).rotmat, truth.rotmat)
        with pytest.raises(ValueError, match="consecutive"):
            read(np.array([3, 5]))


def test_a_source_giving_the_wrong_number_of_poses_is_refused(tmp_path):
    with pytest.raises(ValueError, match="gave 2 poses for 10 rows"):
        with spooled_poses(lambda rows: _truth(2), 20, chunk_rows=10, directory=tmp_path):
            pass


def test_write_poses_star_from_a_source_equals_from_poses(particles_dir, tmp_path):
    """The same file whether the poses come whole or from a chunked source; the source sees every
    chunk once before the output exists, and a failing source leaves no output and no temporary file."""
    table = read_star(particles_dir / SIM)
    truth = _truth(len(table), seed=1)
    write_poses_star(tmp_path / "whole.star", table, truth)
    seen = []

    def source(rows):
        assert not (tmp_path / "chunked.star").exists()
        seen.append(len(rows))
        return Pose(rotmat=truth.rotmat[rows], shift_angst=truth.shift_angst[rows])

    write_poses_star(tmp_path / "chunked.star", table, source, chunk_rows=64)
    assert seen == [b - a for a, b in row_chunks(len(table), 64)]
    assert (tmp_path / "chunked.star").read_text() == (tmp_path / "whole.star").read_text()
    torch.testing.assert_close(read_star(tmp_path / "chunked.star").pose.rotmat, truth.rotmat, atol=1e-6, rtol=0)

    def failing(rows):
        if rows[0] >= 128:
            raise RuntimeError("out of memory")
        return Pose(rotmat=truth.rotmat[rows], shift_angst=truth.shift_angst[rows])

    with pytest.raises(RuntimeError, match="out of memory"):
        write_poses_star(tmp_path / "failed.star", table, failing, chunk_rows=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunked.star", "whole.star"]
