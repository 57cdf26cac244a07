"""TensorBoard is an optional extra: without it training goes on and says so once, with the fix."""

from __future__ import annotations

import sys

import pytest

from cryoace.train import trainer


def test_missing_tensorboard_is_said_once_with_how_to_enable(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setattr(trainer, "_TENSORBOARD_SKIP_SAID", False)
    lines: list[str] = []
    assert trainer.open_tensorboard(tmp_path / "tb", lines.append) is None
    assert trainer.open_tensorboard(tmp_path / "tb2", lines.append) is None  # e.g. the second half model
    assert len(lines) == 1
    assert "TensorBoard scalars are skipped: tensorboard is not installed" in lines[0]
    assert "pip install tensorboard" in lines[0] and "pip install -e .[tensorboard]" in lines[0]
    assert not (tmp_path / "tb").exists()


def test_installed_tensorboard_gives_a_writer(tmp_path):
    pytest.importorskip("tensorboard")
    writer = trainer.open_tensorboard(tmp_path / "tb", lambda m: pytest.fail(m))
    writer.add_scalar("loss", 1.0, 0)
    writer.close()
    assert any((tmp_path / "tb").iterdir())
