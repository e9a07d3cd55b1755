"""The names the change set, the sync, the state and the UI share, defined once.

- `OPS`: what a change-set row asks for; `WORK_OPS` are those that write to Crisp; `PHASES`,
  the order a sync runs them in by default (an activation's `order` may change it);
- `STATUSES`: a person's outcome, from best to worst (a person with several requests has the
  worst of theirs)."""

from typing import Literal, get_args

OPS = ("create", "update", "delete", "release", "skip")
WORK_OPS = ("create", "update", "delete")
Phase = Literal["delete", "update", "create"]
PHASES: tuple[str, ...] = get_args(Phase)
STATUSES = ("ok", "deferred", "rejected", "gone")
