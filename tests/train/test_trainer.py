"""The training loop: every trainable parameter is optimized (the shift head included), config YAML
round trip and presets, resume equals an uninterrupted run bit for bit on the CPU, and a NaN loss
rolls back to the last good checkpoint with half the learning rate."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from cryoace.errors import CryoaceInputError
from cryoace.io.particles import ParticleDataset, read_particles
from cryoace.train import trainer as trainer_module
from cryoace.train.config import PRESETS, load_config, parse_duration, preset_config, save_config
from cryoace.train.trainer import Trainer, load_checkpoint_file

from helpers import tiny_config as tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(simulated_adk):
    return ParticleDataset(read_particles(simulated_adk(n=64).star))


def test_every_trainable_parameter_is_optimized_and_gets_a_gradient(dataset, tmp_path):
    tr = Trainer(tiny(), dataset, tmp_path, progress=False)
    in_opt = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    named = dict(tr.encoder.named_parameters(prefix="encoder")) | dict(tr.decoder.named_parameters(prefix="decoder"))
    assert {id(p) for p in named.values()} == in_opt
    assert any(k.startswith("encoder.shift_head") for k in named)  # the reference forgot this head
    assert any(k.startswith("encoder.rotation_head") for k in named)
    assert not any("filters" in k for k in named)  # the Gaussian bank is fixed
    before = {k: p.detach().clone() for k, p in named.items()}
    for _ in range(3):
        tr.train_step(dataset[list(range(8))])
        assert all(p.grad is not None for p in named.values())
    unchanged = [k for k, p in named.items() if torch.equal(p.detach(), before[k])]
    assert not unchanged, f"parameters never updated: {unchanged}"
    assert tr.optimizer.defaults["amsgrad"] is True


def test_config_yaml_round_trip_and_presets(tmp_path):
    for name in PRESETS:
        cfg = preset_config(name)
        cfg.validate()
        save_config(tmp_path / f"{name}.yaml", cfg, {"provenance": {"command": "x"}})
        loaded, extra = load_config(tmp_path / f"{name}.yaml")
        assert loaded == cfg and extra["provenance"]["command"] == "x"
    paper = preset_config("paper")
    assert (paper.batch_size, paper.optim.lr, paper.optim.amsgrad, paper.optim.grad_clip) == (64, 1e-4, True, 1.0)
    assert paper.encoder.channels == (64, 128, 256, 256, 256) and paper.decoder.hidden == 256
    with pytest.raises(CryoaceInputError, match="unknown preset"):
        preset_config("huge")
    assert parse_duration("30m") == 1800 and parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration("20") == 1200
    with pytest.raises(CryoaceInputError):
        parse_duration("soon")


def _params(tr):
    return {**{f"e.{k}": v for k, v in tr.encoder.state_dict().items()},
            **{f"d.{k}": v for k, v in tr.decoder.state_dict().items()}}


def test_resume_equals_uninterrupted_run_bit_for_bit(dataset, tmp_path):
    full = Trainer(tiny(steps=11, log_every=2, checkpoint_every=4), dataset, tmp_path / "full", progress=False)
    full.fit()
    part = Trainer(tiny(steps=5, log_every=2, checkpoint_every=4), dataset, tmp_path / "part", progress=False)
    part.fit()
    assert part.step == 5
    resumed = Trainer(tiny(steps=11, log_every=2, checkpoint_every=4), dataset, tmp_path / "part", progress=False)
    resumed.load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert resumed.step == 5 and (resumed.epoch, resumed.batch_in_epoch) == (0, 5)
    resumed.fit()
    assert resumed.step == full.step == 11 and resumed.epoch == 1  # 64 particles / 8 = 8 steps an epoch
    a, b = _params(full), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key])


def test_nan_loss_rolls_back_to_the_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = trainer_module.compute_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 7:  # step 7: after the step-4 checkpoint, before the step-8 one
            out = dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(trainer_module, "compute_loss", poisoned)
    cfg = tiny(steps=12, log_every=2, checkpoint_every=4)
    tr = Trainer(cfg, dataset, tmp_path, progress=False, log=lambda m: None)
    tr.fit()
    assert tr.step == 12
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [r for r in records if r["kind"] == "rollback"]
    assert len(rollbacks) == 1
    assert rollbacks[0]["step"] == 8 and rollbacks[0]["to_step"] == 4
    assert rollbacks[0]["lr"] == pytest.approx(cfg.optim.lr / 2)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr / 2)
    assert all(torch.isfinite(v).all() for v in _params(tr).values() if v.is_floating_point())
    last = load_checkpoint_file(tmp_path / "checkpoints" / "last.pt")
    assert last["step"] == 12 and last["lr_factor"] == 0.5
    assert all(torch.isfinite(v).all() for v in last["decoder"].values())
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [2, 4, 6, 6, 8, 10, 12]  # 6 logged, 8 poisoned, back to 4, 6 again...


def test_compile_failure_falls_back_to_eager(dataset, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    messages = []
    tr = Trainer(tiny(steps=2, compile=True), dataset, tmp_path, progress=False, log=messages.append)
    tr.fit()
    assert tr.step == 2 and not tr._compile
    assert any("torch.compile failed" in m and "no C++ compiler" in m for m in messages)
    assert "network" not in vars(tr.decoder)  # no compiled network left on the module


@pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="torch.compile needs a C compiler")
def test_compiled_training_steps_match_eager(dataset, tmp_path):
    """With ``compile`` the steps really run compiled (no fallback) and train like eager steps: after 3
    steps the parameters have moved the same way, to within 1 % of the move (kernels may round
    differently, and Adam's first steps turn a tiny gradient's rounding into a whole step)."""
    eager = Trainer(tiny(steps=3), dataset, tmp_path / "eager", progress=False)
    start = {k: v.clone() for k, v in _params(eager).items()}
    eager.fit()
    messages = []
    compiled = Trainer(tiny(steps=3, compile=True), dataset, tmp_path / "compiled", progress=False,
                       log=messages.append)
    assert all(torch.equal(v, start[k]) for k, v in _params(compiled).items())  # same seed, same start
    compiled.fit()
    assert compiled._compile and compiled._compiled is not None, messages
    assert not any("torch.compile failed" in m for m in messages)
    a, b = _params(eager), _params(compiled)
    floats = [k for k in start if start[k].is_floating_point() and "running" not in k]
    move_e = torch.cat([(a[k] - start[k]).flatten() for k in floats])
    move_c = torch.cat([(b[k] - start[k]).flatten() for k in floats])
    assert move_e.norm() > 0
    assert (move_c - move_e).norm() < 0.01 * move_e.norm()
