"""A run never claims a resolution its data do not support ("Einstein from noise"), writes its half
maps for anyone to check, and says plainly — in its last lines, report.html and exit status — when it
resolved nothing.

The particles are pure Gaussian noise carrying the CTF parameters, pixel size and star file of a
dataset made by another tool (ASPIRE: tests/data/particles/sim_aspire_spike_L64_ctf_snr0.1)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cryoace.cli.main import main as cli
from cryoace.evaluate.gold_standard import UNRESOLVED_EXIT_CODE
from cryoace.evaluate.plots import read_metrics
from cryoace.io.mrc import write_mrc
from cryoace.io.particles import read_particles
from cryoace.pipeline.budget import NETWORK_SHARE

from conftest import TEST_DATA

pytestmark = pytest.mark.usefixtures("one_thread")
ASPIRE = TEST_DATA / "particles/sim_aspire_spike_L64_ctf_snr0.1"


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory):
    """The default reconstruct (cpu preset, short budgets) on 500 images of pure noise."""
    data = tmp_path_factory.mktemp("noise")
    shutil.copy(ASPIRE / "particles.star", data / "particles.star")
    noise = np.random.default_rng(0).standard_normal((500, 64, 64)).astype(np.float32)
    write_mrc(data / "particles_0_499.mrcs", noise, 3.0)
    run = data / "run"
    status = cli(["reconstruct", str(data / "particles.star"), "-o", str(run), "--quiet", "--device", "cpu",
                  "--max-time", "15s", "--ab-initio-iterations", "4", "--refine-rounds", "3"])
    return data, run, status


def test_noise_gets_no_resolution(noise_run, capsys):
    _, run, status = noise_run
    assert status == UNRESOLVED_EXIT_CODE
    gold = json.loads((run / "gold_standard.json").read_text())
    assert gold["resolved"] is False and gold["reasons"]
    # the half maps do not agree at better than 10 px (the claimed, unmasked curve); the masked one can
    # (9.2 px measured once the 15-s budget was split over the stages), which is why it neither is the
    # claim nor decides the verdict
    assert gold["resolution_px"] > 10.0 and gold["masked_resolution_px"] > 6.0
    (record,) = read_metrics(run / "metrics.jsonl", kind="gold_standard")
    assert record["resolved"] is False
    report = (run / "report.html").read_text()
    assert "NOT RESOLVED" in report and "volume_half1.mrc" in report
    check = gold["predictive_check"]  # measured on 2 × 250 particles, shown in the report
    assert check["particles"] == 500 and 0 <= check["observed"] <= 1 and 0 <= check["expected"] <= 1
    assert "predictive check" in report and f"{check['observed']:.2f} vs {check['expected']:.2f}" in report
    assert "histogram of the pose confidences" in report  # each particle's, from poses.star
    # one budget (--max-time 15s) for the whole job: each stage's time recorded and shown
    stages = {r["stage"]: r for r in read_metrics(run / "metrics.jsonl", kind="stage")}
    assert set(stages) == {"networks", "encoder_poses", "ab_initio", "refine_rounds"}
    assert stages["networks"]["budget_s"] == pytest.approx(15 * NETWORK_SHARE)
    assert stages["networks"]["duration_s"] < 15 * NETWORK_SHARE + 3  # (it stops at the first step past it)
    assert stages["networks"]["elapsed_s"] <= stages["ab_initio"]["started_s"] <= stages["refine_rounds"]["started_s"]
    # the ab initio's 6-s share fits one run of the four planned, but a second is made beyond it: the kept
    # start must be found again by another run
    assert 2 <= stages["ab_initio"]["runs"] <= stages["ab_initio"]["planned_runs"]
    assert "Stages and time budget" in report and "of a 15.0 s budget (--max-time)" in report


def test_the_half_maps_give_the_printed_fsc(noise_run, capsys):
    """``cryoace fsc`` on the run's own files reproduces gold_standard.json's numbers."""
    _, run, _ = noise_run
    gold = json.loads((run / "gold_standard.json").read_text())
    for path in ("volume_half1.mrc", "volume_half2.mrc", "volume_mask.mrc", "volume.mrc", "fsc.png"):
        assert (run / path).is_file()
    capsys.readouterr()
    assert cli(["fsc", str(run / "volume_half1.mrc"), str(run / "volume_half2.mrc"), "--json", "-"]) == 0
    unmasked = json.loads(capsys.readouterr().out)
    # the claimed resolution is the unmasked one: no mask to choose
    assert unmasked["resolution"]["0.143"]["px"] == pytest.approx(gold["resolution_px"], rel=1e-6)
    assert gold["unmasked_resolution_px"] == gold["resolution_px"]
    assert cli(["fsc", str(run / "volume_half1.mrc"), str(run / "volume_half2.mrc"), "--mask",
                str(run / "volume_mask.mrc"), "--json", "-"]) == 0
    masked = json.loads(capsys.readouterr().out)
    assert masked["resolution"]["0.143"]["px"] == pytest.approx(gold["masked_resolution_px"], rel=1e-6)


def test_poses_star_says_which_half_and_how_sure(noise_run):
    data, run, _ = noise_run
    table = read_particles(run / "poses.star")
    subset = table.extra_column("rlnRandomSubset")
    confidence = table.extra_column("cryoacePoseConfidence")
    assert subset is not None and set(np.unique(subset).tolist()) == {1, 2}
    assert abs(int((subset == 1).sum()) - int((subset == 2).sum())) <= 1
    assert confidence is not None and np.all((confidence >= 0) & (confidence <= 1))


def test_halves_on_noise_get_no_resolution(noise_run, capsys):
    """``--halves`` (two independently initialised networks, one per half set) judges its half maps as
    the refinement does: on pure noise it writes them with their mask, says NOT RESOLVED and exits 4."""
    data, _, _ = noise_run
    run = data / "run_halves"
    status = cli(["reconstruct", str(data / "particles.star"), "-o", str(run), "--device", "cpu", "--halves",
                  "--preset", "tiny", "--steps", "20"])
    out = capsys.readouterr().out
    assert status == UNRESOLVED_EXIT_CODE and "NOT RESOLVED" in out, out
    gold = json.loads((run / "gold_standard.json").read_text())
    assert gold["resolved"] is False and gold["unmasked_resolution_px"] > 10.0
    for path in ("volume_half1.mrc", "volume_half2.mrc", "volume_mask.mrc", "volume.mrc"):
        assert (run / path).is_file()
    (record,) = read_metrics(run / "metrics.jsonl", kind="gold_standard")
    assert record["resolved"] is False
