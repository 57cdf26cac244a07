"""One wall-time budget for a whole reconstruction run (``--max-time``), split over its stages.

With a refinement stage a run goes through: the networks' training, the encoder's pass over every
particle (``poses_encoder.star``), the ab initio runs, the refinement rounds (on a bounded subset of
the particles), the final pass over the particles that were not in the rounds, the optional
teaching of an encoder from the map, and the outputs. ``--max-time`` bounds them all
(:class:`JobBudget`):

* the networks train for :data:`NETWORK_SHARE` of it (all of it when no refinement follows: then
  they are the result);
* the ab initio runs get at most :data:`AB_INITIO_SHARE` of it: each runs its whole schedule, and
  another starts only while one more fits (a busy machine gets fewer runs, not shorter ones:
  :func:`~cryoace.reconstruct.ab_initio.ab_initio_starts`);
* the refinement rounds get what is left, less an estimate of what still follows them — the final
  pass over the other particles (the longest round's time per particle) and the teaching — and the
  last round that fits is made the final one: the full band, every particle searched globally
  (:class:`~cryoace.reconstruct.refine.RefineSettings`, ``max_time_s`` and ``reserve_s``).

The final pass poses each particle once and cannot be cut: with many particles on a short budget the
job runs over, and the log says so with the estimate before the rounds start. Each stage's start,
duration and budget go to metrics.jsonl as a ``stage`` record (:func:`stage_record`), to the log and
to report.html. Times add up over resumed sessions where the stage keeps its own (training, the
refinement), so ``--resume`` with a larger ``--max-time`` gives every stage its larger share.
"""

from __future__ import annotations

import dataclasses

__all__ = ["JobBudget", "NETWORK_SHARE", "AB_INITIO_SHARE", "stage_record", "describe_stages", "STAGE_NAMES"]

#: the networks' share of the whole budget when a refinement stage follows: at low SNR their map
#: rarely seeds the refinement (the ab initio map explains the images better), noise free it can
NETWORK_SHARE = 0.25
#: the most the ab initio runs may take of the whole budget (the robustness of the result rests on
#: them: on 2000 particles of 64 px each run takes about 80 s of an idle 2-core CPU, so the four
#: default runs fit in the 8 min of a 20-min budget with room for a machine 1.5× slower)
AB_INITIO_SHARE = 0.40


@dataclasses.dataclass(frozen=True)
class JobBudget:
    """The whole run's wall-time budget (s; None = unbounded) and whether a refinement stage follows
    the networks (``staged``): see the module docstring."""

    total_s: float | None
    staged: bool

    @classmethod
    def of(cls, config) -> JobBudget:
        """The budget of a :class:`~cryoace.train.config.TrainConfig` (``--halves`` runs have no
        refinement stage: their two trainings share the whole budget)."""
        return cls(config.max_time_s, bool(config.refine.enabled and not config.halves))

    def networks_s(self) -> float | None:
        """The networks' training time (s)."""
        if self.total_s is None:
            return None
        return self.total_s * NETWORK_SHARE if self.staged else self.total_s

    def ab_initio_s(self) -> float | None:
        """The ab initio runs' wall time, all of them together (s)."""
        return None if self.total_s is None else self.total_s * AB_INITIO_SHARE

    def left_s(self, elapsed_s: float) -> float | None:
        """What is left of the budget after ``elapsed_s`` (s; may be negative when it is spent)."""
        return None if self.total_s is None else self.total_s - elapsed_s

    def describe(self) -> str:
        """One line for the log: how the budget is split."""
        if self.total_s is None:
            return "no time budget: every stage runs its full schedule"
        if not self.staged:
            return f"time budget {self.total_s / 60:.3g} min, all of it for the networks' training"
        return (f"time budget {self.total_s / 60:.3g} min for the whole job: the networks "
                f"{self.networks_s() / 60:.3g} min, the ab initio at most {self.total_s * AB_INITIO_SHARE / 60:.3g} "
                "min, the refinement what is left (its last round is brought forward so that the final pass over "
                "every particle fits)")


#: the stages' names in the log and the report
STAGE_NAMES = {"networks": "networks' training", "encoder_poses": "encoder's poses of every particle",
               "ab_initio": "ab initio", "refine_rounds": "refinement rounds",
               "final_pass": "final pass over the other particles", "teach": "encoder taught from the map"}


def stage_record(stage: str, step: int, started_s: float, ended_s: float, budget_s: float | None = None,
                 **extra) -> dict:
    """A ``stage`` record for metrics.jsonl: the stage's name, when it started and ended in the
    run's wall time (s), its duration and its budget (s; None = unbounded), and ``extra`` results."""
    return {"kind": "stage", "step": step, "stage": stage, "started_s": started_s, "elapsed_s": ended_s,
            "duration_s": ended_s - started_s, "budget_s": budget_s, **extra}


def describe_stages(records: list[dict], total_s: float | None) -> str:
    """One line for the log: each stage's wall time (of this session's records) and the whole run's
    against ``total_s`` (the budget, s; None = unbounded)."""
    parts = [f"{STAGE_NAMES.get(r['stage'], r['stage'])} {r['duration_s'] / 60:.1f} min" for r in records]
    end = max(float(r["elapsed_s"]) for r in records)
    whole = f"{end / 60:.1f} min" + ("" if total_s is None else f" of the {total_s / 60:.3g}-min budget")
    return f"stages: {', '.join(parts)}; the run so far {whole}"
