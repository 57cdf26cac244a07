"""One budget for the whole job (issue 15): ``--max-time`` split over the stages."""

import pytest

from cryoace.pipeline.budget import AB_INITIO_SHARE, NETWORK_SHARE, JobBudget, describe_stages, stage_record
from cryoace.train.config import preset_config


def test_the_cpu_preset_bounds_the_whole_job_and_splits_it():
    config = preset_config("cpu")
    assert config.max_time_s == 20 * 60 and config.refine.enabled
    budget = JobBudget.of(config)
    assert budget.staged and budget.networks_s() == pytest.approx(20 * 60 * NETWORK_SHARE)
    assert budget.ab_initio_s() == pytest.approx(20 * 60 * AB_INITIO_SHARE)
    assert budget.left_s(1000.0) == pytest.approx(200.0) and budget.left_s(1300.0) < 0
    assert "20 min for the whole job" in budget.describe()


def test_without_a_refinement_stage_the_networks_have_it_all():
    config = preset_config("cpu")
    config.refine.enabled = False
    assert JobBudget.of(config).networks_s() == 20 * 60
    config.refine.enabled, config.halves = True, True  # --halves: two trainings share it, no refinement
    assert JobBudget.of(config).networks_s() == 20 * 60
    assert JobBudget(None, True).networks_s() is None and JobBudget(None, True).left_s(5.0) is None
    assert JobBudget(None, True).ab_initio_s() is None


def test_half_models_train_for_half_the_budget_each():
    """--halves with the cpu preset's refinement switched on: each half model trains for half of
    --max-time (not a quarter of it, as a networks stage before a refinement would)."""
    from cryoace.pipeline.halves import half_config

    config = preset_config("cpu")
    config.halves = True
    half = half_config(config, 7)
    assert half.seed == 7 and not half.halves and not half.refine.enabled
    assert JobBudget.of(half).networks_s() == 10 * 60


def test_stage_records_and_their_summary():
    records = [stage_record("networks", 10, 0.0, 300.0, 300.0, steps=10),
               stage_record("ab_initio", 10, 360.0, 660.0, 420.0, runs=3),
               stage_record("refine_rounds", 10, 660.0, 1150.0, 500.0, rounds=7)]
    assert records[1]["duration_s"] == 300.0 and records[1]["runs"] == 3 and records[0]["kind"] == "stage"
    line = describe_stages(records, 1200.0)
    assert "networks' training 5.0 min" in line and "ab initio 5.0 min" in line
    assert line.endswith("the run so far 19.2 min of the 20-min budget")
