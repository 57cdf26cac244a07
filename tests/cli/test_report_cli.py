"""``cryoace report``: writes the HTML report (to RUN_DIR or -o) from whatever the run directory holds,
saying which inputs are missing; a missing or non-run directory is one line, exit 2."""

from __future__ import annotations

import json

import numpy as np

from cryoace.cli.main import main as cli
from cryoace.io.mrc import write_mrc


def _partial_run(run):
    """A run cut short: config.yaml, two loss records and a map; no poses.star, no FSC."""
    run.mkdir()
    (run / "config.yaml").write_text("config:\n  preset: tiny\n  batch_size: 8\ndata:\n  pixel_size: 3.0\n"
                                     "  image_size: 16\n  n_particles: 10\n")
    records = [{"kind": "train", "step": s, "epoch": s / 2, "loss": 1.0 / s, "images_per_s": 100.0,
                "elapsed_s": 0.5 * s} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_mrc(run / "volume.mrc", np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32), 3.0)
    return run


def test_report_of_a_partial_run(tmp_path, capsys):
    run = _partial_run(tmp_path / "run")
    assert cli(["report", str(run)]) == 0
    assert str(run / "report.html") in capsys.readouterr().out
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "No poses.star" in page and "No FSC curves" in page and page.count("data:image/png;base64,") == 2
    out = tmp_path / "elsewhere.html"
    assert cli(["report", str(run), "-o", str(out)]) == 0 and out.is_file()


def test_bad_run_dir_is_one_line_exit_2(tmp_path, capsys):
    for path, fragment in ((tmp_path / "nope", "run directory not found"),
                           (tmp_path, "not a run directory")):
        assert cli(["report", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("cryoace report: error:"), err
        assert str(path) in err and fragment in err
    assert not (tmp_path / "report.html").exists()
