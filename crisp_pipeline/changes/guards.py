"""Mirror's safety catch: no deletions from an empty source, none beyond the configured limits,
unless a run says so explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field

from crisp_pipeline.activation import ActivationConfig, Mode

OVERRIDE_HINT = ("to go ahead for one run, launch it with run config "
                 "`resources: {crisp_run: {config: {override_guards: true}}}` "
                 "(or `crisp-pipeline demo`-style Python: CrispRunOptions(override_guards=True))")


@dataclass(frozen=True)
class GuardVerdict:
    passed: bool
    deletes: int
    managed: int
    source_rows: int
    problems: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.deletes / self.managed if self.managed else 0.0

    def describe(self) -> str:
        if self.passed:
            return (f"{self.deletes} deletion(s) of {self.managed} managed people: within limits")
        return "; ".join(self.problems) + f". {OVERRIDE_HINT}"


def evaluate_guards(config: ActivationConfig, deletes: int, managed: int,
                    source_rows: int) -> GuardVerdict:
    problems = []
    if config.mode == Mode.MIRROR:
        if source_rows == 0:
            problems.append(f"the segment of {config.name!r} is empty; mirror would delete "
                            f"all {managed} managed people, so it refuses to run")
        if deletes > config.guards.max_deletes:
            problems.append(f"{deletes} people would be deleted, more than max_deletes "
                            f"({config.guards.max_deletes})")
        if managed and deletes / managed > config.guards.max_delete_fraction:
            problems.append(f"{deletes} of {managed} managed people ({deletes / managed:.1%}) "
                            "would be deleted, more than max_delete_fraction "
                            f"({config.guards.max_delete_fraction:.1%})")
    return GuardVerdict(not problems, deletes, managed, source_rows, problems)
