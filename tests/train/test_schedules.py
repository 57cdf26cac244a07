"""Warm-up multi-step learning-rate schedule (ACE-EM's WarmupMultiStepLR)."""

import pickle

import pytest
import torch

from cryoace.train.schedules import lr_factor, warmup_multistep_scheduler


def test_linear_warmup_then_steps_at_milestones():
    kw = dict(warmup_steps=10, milestones=(20, 30), gamma=0.5, warmup_start_factor=0.0)
    assert lr_factor(0, **kw) == 0.0
    assert lr_factor(5, **kw) == pytest.approx(0.5)
    assert lr_factor(9, **kw) == pytest.approx(0.9)
    assert [lr_factor(s, **kw) for s in (10, 19, 20, 29, 30, 1000)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    # default start factor 1e-3 (Detectron's): ~0 at step 0, still linear
    assert lr_factor(0, 100) == pytest.approx(1e-3)
    assert lr_factor(50, 100) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert lr_factor(7) == 1.0  # no warm-up, no milestones
    assert lr_factor(5, 0, (5,), 0.1) == pytest.approx(0.1)  # a milestone applies from its own step
    assert lr_factor(5, 10, (2,), 0.1, 0.0) == pytest.approx(0.05)  # inside the ramp: multiplies it


def test_invalid_arguments():
    for kw in (dict(warmup_steps=-1), dict(milestones=(30, 20)), dict(gamma=0.0),
               dict(warmup_start_factor=1.5)):
        with pytest.raises(ValueError):
            lr_factor(0, **kw)
        with pytest.raises(ValueError):
            warmup_multistep_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), **kw)


def test_scheduler_scales_each_parameter_group_and_resumes():
    grid, enc = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)

    def make():
        opt = torch.optim.AdamW([{"params": [grid], "lr": 1.0}, {"params": [enc], "lr": 1e-3}])
        return opt, warmup_multistep_scheduler(opt, warmup_steps=4, milestones=(6,), gamma=0.1,
                                               warmup_start_factor=0.0)

    opt, sched = make()
    seen = []
    for _ in range(8):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    factors = [lr_factor(s, 4, (6,), 0.1, 0.0) for s in range(8)]
    for (lr_grid, lr_enc), f in zip(seen, factors, strict=True):
        assert lr_grid == pytest.approx(f) and lr_enc == pytest.approx(1e-3 * f)
    # resume: a fresh scheduler loaded from the state dict continues at the same step
    state = pickle.loads(pickle.dumps(sched.state_dict()))
    opt2, sched2 = make()
    sched2.load_state_dict(state)
    sched2.step()
    opt.step()
    sched.step()
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert sched.get_last_lr() == pytest.approx([0.1, 1e-4])
