"""Mirror's safety catch: no deletions from an empty source, none beyond the configured limits
(in this run, and over the rolling window together with the deletions already done), unless a
run says so explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field

from crisp_pipeline.activation import ActivationConfig, Mode

OVERRIDE_HINT = ("To go ahead once, launch a run with the run config "
                 "`resources: {crisp_run: {config: {override_guards: true}}}` "
                 "(in Python: CrispRunOptions(override_guards=True)).")


@dataclass(frozen=True)
class GuardVerdict:
    passed: bool
    deletes: int
    managed: int
    source_rows: int
    problems: list[str] = field(default_factory=list)
    deleted_in_window: int = 0

    @property
    def fraction(self) -> float:
        """This run's deletions and the window's, over the people managed before them."""
        before = self.managed + self.deleted_in_window
        return (self.deletes + self.deleted_in_window) / before if before else 0.0

    def describe(self) -> str:
        if self.passed:
            window = (f" ({self.deleted_in_window} more in the window)"
                      if self.deleted_in_window else "")
            return (f"{self.deletes} deletion(s) of {self.managed} managed people{window}: "
                    "within limits")
        return f"{self._why()} {OVERRIDE_HINT}"

    def refusal(self) -> str:
        """The paragraph a refused sync shows and alerts: why, what happened, what to do."""
        return f"{self._why()} Nothing was sent. {OVERRIDE_HINT}"

    def _why(self) -> str:
        return "; ".join(self.problems) + "."


def evaluate_guards(config: ActivationConfig, deletes: int, managed: int,
                    source_rows: int, deleted_in_window: int = 0) -> GuardVerdict:
    problems = []
    guards = config.guards
    if config.mode == Mode.MIRROR:
        window = (f" together with the {deleted_in_window} already deleted in the last "
                  f"{guards.window_hours:g} h" if deleted_in_window else "")
        total = deletes + deleted_in_window
        before = managed + deleted_in_window
        if source_rows == 0:
            problems.append(f"the segment of {config.name!r} is empty; mirror would delete "
                            f"all {managed} managed people, so it refuses to run")
        if deletes and total > guards.max_deletes:
            problems.append(f"{deletes} people would be deleted{window}, more than "
                            f"max_deletes ({guards.max_deletes})")
        if deletes and before and total / before > guards.max_delete_fraction:
            problems.append(f"{total} of {before} managed people ({total / before:.1%}) would be "
                            f"deleted{window}, more than max_delete_fraction "
                            f"({guards.max_delete_fraction:.1%})" if deleted_in_window else
                            f"{deletes} of {managed} managed people ({total / before:.1%}) "
                            "would be deleted, more than max_delete_fraction "
                            f"({guards.max_delete_fraction:.1%})")
    return GuardVerdict(not problems, deletes, managed, source_rows, problems,
                        deleted_in_window)
