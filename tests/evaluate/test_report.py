"""The run report: a tiny run writes a self-contained report.html with every section (images as
data URIs, no network resource); half-map FSC records and an evaluation.json add their curves and
resolutions; missing inputs leave a one-sentence note; a failing report never loses a run."""

from __future__ import annotations

import base64
import json
import re
import shutil

import matplotlib.image
import numpy as np
import pytest
import torch

from cryoace.evaluate.fsc import fsc
from cryoace.evaluate.plots import plot_viewing_directions
from cryoace.evaluate.report import SECTIONS, fsc_from_halves_record, write_report
from cryoace.physics.rotations import random_rotmat

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _section(page: str, key: str) -> str:
    m = re.search(rf'<section id="{key}">(.*?)</section>', page, re.S)
    assert m, f"section {key} missing"
    return m.group(1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 10-step tiny run on 64 simulated noisy particles (L=32, CTF): it writes report.html itself."""
    from cryoace.pipeline.run import run_reconstruction
    from cryoace.train.config import preset_config

    from helpers import simulate_adk

    base = tmp_path_factory.mktemp("report")
    sim = simulate_adk(base / "data", n=64, noise_free=False, seed=1, defocus_spread=0.2)
    config = preset_config("tiny")
    config.steps, config.log_every, config.volume_every, config.device = 10, 5, 0, "cpu"
    messages = []
    run_reconstruction(sim.star, base / "run", config, progress=False, log=messages.append)
    assert any("report.html" in m for m in messages), messages
    return base / "run"


def test_tiny_run_writes_a_self_contained_report(run_dir):
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    for key, title in SECTIONS.items():
        assert f"<h2>{title}</h2>" in _section(page, key)
    assert not re.search(r"https?://", page) and "<script" not in page and "<link" not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for key in ("loss", "coverage", "map"):  # one embedded, decodable PNG each
        (b64,) = PNG_URI.findall(_section(page, key))
        assert base64.b64decode(b64).startswith(b"\x89PNG")
    timings = _section(page, "timings")
    assert "training time" in timings and "images / s" in timings and ">10<" in timings  # steps
    assert "preset: tiny" in _section(page, "config")
    # no FSC yet: both FSC sections say so in a sentence instead of disappearing
    assert 'class="missing"' in _section(page, "fsc") and not PNG_URI.search(_section(page, "fsc"))
    assert 'class="missing"' in _section(page, "resolution")


def _halves_record(step: int, elapsed: float, result) -> dict:
    res = result.resolution(0.143).angstrom
    return {"kind": "halves", "step": step, "elapsed_s": elapsed, "resolution_angst": res,
            "freq_cyc_angst": result.freq_per_angstrom.tolist(), "fsc": result.curve.tolist()}


def _noisy_pair(noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.avg_pool3d(torch.randn(1, 1, 32, 32, 32, generator=g), 3, 1, 1)[0, 0]
    return v + noise * torch.randn(v.shape, generator=g), v + noise * torch.randn(v.shape, generator=g)


def test_report_shows_half_map_and_truth_fsc(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    early, late = fsc(*_noisy_pair(0.6), voxel_size=3.0), fsc(*_noisy_pair(0.2), voxel_size=3.0)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(_halves_record(5, 1.5, early)) + "\n")
        fh.write(json.dumps(_halves_record(10, 3.0, late)) + "\n")
    truth = fsc(*_noisy_pair(0.4, seed=1), voxel_size=3.0)
    (run / "evaluation.json").write_text(json.dumps({"fsc_vs_truth": truth.to_dict()}))
    page = write_report(run).read_text(encoding="utf-8")
    section = _section(page, "fsc")
    res = late.resolution(0.143).angstrom
    assert f"{res:.2f} Å" in section and "step 10" in section
    assert "vs ground truth" in section and f"{truth.resolution(0.5).angstrom:.2f} Å" in section
    assert len(PNG_URI.findall(section)) == 1
    history = _section(page, "resolution")
    assert len(PNG_URI.findall(history)) == 1 and f"{early.resolution(0.143).angstrom:.2f} Å" in history


def test_halves_record_round_trips_to_an_fsc_result():
    result = fsc(*_noisy_pair(0.3), voxel_size=2.5)
    back = fsc_from_halves_record(_halves_record(1, 1.0, result), pixel_size=2.5)
    assert back.box_size == 32 and back.voxel_size == 2.5
    np.testing.assert_allclose(back.freq_cyc_px, result.freq_cyc_px, atol=1e-12)
    assert back.resolution(0.143).angstrom == pytest.approx(result.resolution(0.143).angstrom)
    # without a pixel size, the last shell is taken as Nyquist
    assert fsc_from_halves_record(_halves_record(1, 1.0, result)).voxel_size == pytest.approx(2.5)


def test_plot_viewing_directions(tmp_path):
    """Uniform poses colour the whole map; poses all looking from one direction colour one cell (the
    colour bar is in both): the plot shows where the views are."""

    def coloured_pixels(rotmat, name):
        plot_viewing_directions(rotmat, tmp_path / name)
        image = matplotlib.image.imread(tmp_path / name)[..., :3]
        return int(((image.max(-1) - image.min(-1)) > 0.15).sum())  # viridis: saturated; axes, text: grey

    uniform = coloured_pixels(random_rotmat(500, generator=torch.Generator().manual_seed(0)), "uniform.png")
    one_view = coloured_pixels(torch.eye(3, dtype=torch.float64).expand(500, 3, 3), "one_view.png")
    assert uniform > 4 * one_view > 0


def test_a_failing_report_does_not_lose_the_run(tmp_path, monkeypatch):
    import cryoace.evaluate.report as report
    from cryoace.pipeline.rundir import write_run_report

    def broken(run_dir, path=None):
        raise RuntimeError("no plots today")

    monkeypatch.setattr(report, "write_report", broken)
    messages = []
    write_run_report(tmp_path, messages.append)  # logs, does not raise
    assert len(messages) == 1 and "no plots today" in messages[0] and "cryoace report" in messages[0]


def test_coverage_of_many_poses_plots_an_even_sample(run_dir, tmp_path, monkeypatch):
    """Beyond COVERAGE_SAMPLE poses the map is made from evenly spaced rows, and the caption says so."""
    import cryoace.evaluate.report as report

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    monkeypatch.setattr(report, "COVERAGE_SAMPLE", 10)
    section = _section(write_report(copy).read_text(encoding="utf-8"), "coverage")
    assert "10 evenly spaced particles of 64" in section and len(PNG_URI.findall(section)) == 1
    monkeypatch.setattr(report, "COVERAGE_SAMPLE", 64)
    assert "evenly spaced" not in _section(write_report(copy).read_text(encoding="utf-8"), "coverage")


def test_pose_confidence_histogram_counts_unmeasured_particles(tmp_path):
    """NaN confidences (poses kept from a local search) are counted in the title, not drawn; the
    median of the gold standard ignores them."""
    from cryoace.evaluate.gold_standard import assess
    from cryoace.evaluate.plots import plot_pose_confidence

    confidence = np.r_[np.linspace(0.1, 1.0, 10), [np.nan] * 5]
    path = tmp_path / "confidence.png"
    plot_pose_confidence(confidence, path)
    assert matplotlib.image.imread(path).shape[-1] in (3, 4)
    plot_pose_confidence(np.full(3, np.nan), tmp_path / "none.png")  # nothing measured: still a plot
    half = torch.randn(16, 16, 16, generator=torch.Generator().manual_seed(0))
    gold = assess(half, half + 0.1 * torch.randn(16, 16, 16), 12.0, 1.0, confidence=confidence)
    assert gold.confidence_median == pytest.approx(0.5)  # (torch: the lower middle of the 10 measured)
