"""Exit statuses: a run that diverges on good input is not bad input — one line, exit 3 (bad input is
exit 2, see test_bad_input.py)."""

from __future__ import annotations

import dataclasses

import pytest

from cryoace.cli.main import main as cli
from cryoace.errors import EXIT_RUN_FAILED, CryoaceInputError, CryoaceRunError
from cryoace.train import trainer as trainer_module
from cryoace.train.trainer import TrainingDiverged

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_diverging_run_is_one_line_and_exit_3(simulated_adk, tmp_path, capsys, monkeypatch):
    assert issubclass(TrainingDiverged, CryoaceRunError) and not issubclass(TrainingDiverged, CryoaceInputError)
    real = trainer_module.compute_loss

    def diverging(*args, **kwargs):  # every step's loss is NaN: each rollback meets NaN again
        out = real(*args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("nan"))

    monkeypatch.setattr(trainer_module, "compute_loss", diverging)
    run = tmp_path / "run"
    rc = cli(["reconstruct", str(simulated_adk(n=64).star), "-o", str(run), "--preset", "tiny", "--steps", "20",
              "--log-every", "2", "--checkpoint-every", "2", "--device", "cpu", "--quiet", "--no-check-contrast"])
    err = capsys.readouterr().err
    assert rc == EXIT_RUN_FAILED == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryoace reconstruct: error: the loss became NaN/Inf")
    assert "5 rollbacks" in lines[0] and "Traceback" not in err
    assert not (run / "volume.mrc").exists()  # no result that looks final
