"""The refinement under a time budget (issue 15, one budget): the last round that fits is made the final
one — the last round's band, every particle searched globally — and a refinement that ended on such a
round goes on after a resume only with more time. On ASPIRE's spike images (another simulator)."""

import pytest

from cryoace.physics.rotations import geodesic_angle
from cryoace.reconstruct.refine import RefineSettings, RefineState, lowpass, refine

pytestmark = pytest.mark.usefixtures("one_thread")


def _median_deg(a, b) -> float:
    return float(geodesic_angle(a.double(), b.double()).rad2deg().median())


def _state(result, rounds) -> RefineState:
    return RefineState(round=rounds[-1].round, pose=result.pose, half_references=result.half_volumes,
                       volume=result.volume, half_volumes=result.half_volumes, confidence=result.confidence,
                       final=rounds[-1].final, longest_round_s=1.0)


def test_a_spent_budget_brings_the_final_round_forward(aspire):
    dataset, batch, spike = aspire
    settings = RefineSettings(rounds=5, start_shells=12, shells_per_round=4, check_particles=0, max_time_s=0.0)
    rounds, states = [], []
    result = refine(dataset, lowpass(spike, 8.0), settings, progress=False,
                    on_round=lambda record, pose, volume: rounds.append(record), on_state=states.append)
    # round 0 (nothing measured yet to judge the time by), then the final round at the schedule's last band
    assert [r.round for r in rounds] == [0, 1] and [r.final for r in rounds] == [False, True]
    # the schedule's last round (4): local band 12 + 4 × 4 shells, global 6 + 2 × 4 capped at 12 (round 1's: 16, 8)
    assert (rounds[1].global_shells, rounds[1].local_shells) == (12, 28)
    assert rounds[1].global_fraction == 1.0  # every particle searched globally in the final round
    assert states[-1].final and states[-1].longest_round_s > 0
    assert _median_deg(result.pose.rotmat, batch.pose.rotmat) < 3.0  # two rounds from an 8-px start
    # resumed with no more time: nothing more is done; with no budget: the schedule's other rounds run
    again = refine(dataset, spike, settings, resume=states[-1], progress=False)
    assert again.rounds == [] and again.pose.rotmat.shape == result.pose.rotmat.shape
    more = []
    refine(dataset, spike, RefineSettings(rounds=5, start_shells=12, shells_per_round=4, check_particles=0),
           resume=states[-1], progress=False, on_round=lambda record, pose, volume: more.append(record))
    assert [r.round for r in more] == [2, 3, 4] and [r.final for r in more] == [False, False, True]


def test_the_reserve_is_estimated_per_particle_and_kept_out_of_the_rounds(aspire):
    """The reserve (what follows the rounds) gets the longest round's time per particle; a reserve
    larger than the budget ends the rounds as a spent budget does, one far below it changes nothing."""
    dataset, _, spike = aspire
    seen = []

    def reserve(per_particle_s: float) -> float:
        seen.append(per_particle_s)
        return 1e6 * per_particle_s  # a million more particles

    rounds = []
    settings = RefineSettings(rounds=4, start_shells=12, shells_per_round=6, check_particles=0, max_time_s=3600.0,
                              reserve_s=reserve)
    refine(dataset, lowpass(spike, 8.0), settings, progress=False,
           on_round=lambda record, pose, volume: rounds.append(record))
    assert seen and all(0 < p < 10 for p in seen)
    assert [r.final for r in rounds] == [False, True]
    rounds.clear()
    refine(dataset, lowpass(spike, 8.0), RefineSettings(rounds=3, start_shells=12, shells_per_round=6,
                                                        check_particles=0, max_time_s=3600.0, reserve_s=1.0),
           progress=False, on_round=lambda record, pose, volume: rounds.append(record))
    assert [r.round for r in rounds] == [0, 1, 2] and [r.final for r in rounds] == [False, False, True]


def test_the_final_round_is_budgeted_at_its_own_cost():
    """The final round searches every particle globally at the last band: it is budgeted as
    FINAL_ROUND_COST rounds, so a round is made the final one when it and the final would not fit —
    not only when two ordinary rounds would not (that ended 20-minute jobs up to 38 s late)."""
    from cryoace.reconstruct.refine import FINAL_ROUND_COST, final_round_due

    assert FINAL_ROUND_COST >= 1.5
    settings = RefineSettings(rounds=10, max_time_s=100.0)
    # 50 s spent, rounds of 20 s: two ordinary rounds fit (90 s), this one and the final do not (50 + 20 + 40)
    assert final_round_due(settings, 3, 50.0, 20.0, 1000)
    assert not final_round_due(settings, 3, 30.0, 20.0, 1000)  # 30 + 20 + 40 = 90 s: fits
    assert final_round_due(settings, 9, 0.0, 20.0, 1000)  # the schedule's last
    assert not final_round_due(settings, 0, 99.0, 0.0, 1000)  # nothing measured yet
    assert not final_round_due(RefineSettings(rounds=10), 3, 1e9, 20.0, 1000)  # no budget
    # the reserve counts too: 30 + 20 + 40 + 15 > 100
    assert final_round_due(RefineSettings(rounds=10, max_time_s=100.0, reserve_s=15.0), 3, 30.0, 20.0, 1000)
