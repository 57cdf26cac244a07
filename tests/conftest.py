"""Shared test fixtures, and where the real files written by other programs live: ``tests/data``
(each file's origin and licence in tests/data/SOURCES.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

TEST_DATA: Path = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session", name="test_data")
def _test_data() -> Path:
    """``tests/data``. Its absence is an error, not a skip: the interop tests are the point."""
    if not TEST_DATA.is_dir():
        pytest.fail(f"test data not found at {TEST_DATA} (the repository's tests/data folder)")
    return TEST_DATA


@pytest.fixture(scope="session")
def particles_dir(test_data: Path) -> Path:
    """``tests/data/particles``."""
    return test_data / "particles"


def _line_projection(image, direction, size):
    """Line integral of ``image`` onto the in-plane unit ``direction`` (x, y), 1-px bins about L//2."""
    import numpy as np

    c = np.arange(size) - size // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    s = direction[0] * x + direction[1] * y
    hist, _ = np.histogram(s.ravel(), bins=np.arange(-size, size + 1) * 1.0, weights=image.ravel())
    return hist


def common_line_correlation(rotmats, images, pairs=None, seed=0):
    """Mean correlation of the common-line projections of image pairs under poses ``rotmats``.

    With R mapping volume to image coordinates (docs/conventions.md §1), images i and j both contain the line
    integral of the volume onto n = R_i[2] × R_j[2]; in image k it is the projection onto
    direction (R_k n)_xy. Right poses give correlations near 1; transposed ones do not.
    """
    import numpy as np

    rotmats = np.asarray(rotmats, dtype=np.float64)
    images = np.asarray(images, dtype=np.float64)
    n, size = len(rotmats), images.shape[-1]
    if pairs is None:
        all_pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        rng = np.random.default_rng(seed)
        pick = rng.permutation(len(all_pairs))[:100]
        pairs = [all_pairs[k] for k in pick]
    scores = []
    for i, j in pairs:
        axis = np.cross(rotmats[i][2], rotmats[j][2])
        norm = np.linalg.norm(axis)
        if norm < 1e-3:
            continue
        axis /= norm
        a = _line_projection(images[i], (rotmats[i] @ axis)[:2], size)
        b = _line_projection(images[j], (rotmats[j] @ axis)[:2], size)
        scores.append(np.corrcoef(a, b)[0, 1])
    return float(np.mean(scores))


@pytest.fixture(scope="session")
def common_lines():
    """The :func:`common_line_correlation` helper (rotmats, images) -> mean correlation."""
    return common_line_correlation


@pytest.fixture
def one_thread():
    """Tiny networks on a shared 2-core machine: one torch thread avoids OpenMP oversubscription
    (several times faster when other jobs share the CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_cli(capsys):
    """``cryoace <argv>`` in-process: returns (exit code, stdout, stderr)."""
    from cryoace.cli import main as cli_main

    def run(*argv):
        rc = cli_main.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


# -- simulated data shared by several modules (helpers.py holds the plain functions) --------------

@pytest.fixture(scope="session")
def simulated_adk(tmp_path_factory):
    """``simulated_adk(n=64, seed=0, ...)`` → the :func:`helpers.simulate_adk` dataset of those
    arguments, simulated once per session and shared by every module asking for the same one (tests
    must not modify its files)."""
    from helpers import simulate_adk

    cache = {}

    def make(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            cache[key] = simulate_adk(tmp_path_factory.mktemp("sim") / "data", **kwargs)
        return cache[key]

    return make


@pytest.fixture
def tiny_config():
    """:func:`helpers.tiny_config`: ``tiny_config(**changes)`` → the tiny preset on the CPU, batch 8."""
    from helpers import tiny_config

    return tiny_config


@pytest.fixture(scope="session")
def aspire():
    """:func:`helpers.aspire_spike_clean`: (dataset, batch of all 100 images, the true map in their units)."""
    from helpers import aspire_spike_clean

    return aspire_spike_clean()
