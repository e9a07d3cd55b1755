"""The cost of a full reconcile: re-reading every managed person in Crisp to find who was
deleted or edited there. Two contenders do the same work on the same state and the same
Crisp, and must find the very same drift:
- `chosen`: what the pipeline does (`sync.reconcile`: a listing of the website at 50 people a
  request when that is cheaper, then one people-data read per person);
- `lookups`: one `GET people/profile/{id}` (and one `GET people/data/{id}`) per person, what a
  hand-written script does.

    python bench/reconcile_cost.py                 # 10,000 people, with and without attributes
    python bench/reconcile_cost.py --people 2000 --trials 5

Figures: requests (deterministic) and seconds (median of the trials, interleaved), against
the emulator in this process.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl

from crisp_pipeline.activation import ReconcilePolicy
from crisp_pipeline.crisp import CrispSettings, Secret
from crisp_pipeline.emulator import EmulatorConfig, TokenSpec, start_in_thread
from crisp_pipeline.state.store import StateStore, connect_file, now
from crisp_pipeline.sync.client import ClientOptions
from crisp_pipeline.sync.reconcile import reconcile_snapshot

WEBSITE, TOKEN = "bench", TokenSpec("bench-id", "bench-key", "user")  # no daily quota


def seed(running, people: int, fields: list[str], template: Path) -> None:
    """`people` managed people in Crisp and in a state file; 0.5% deleted in Crisp and 0.5%
    with their nickname edited there since."""
    store = running.emulator.store
    rows = []
    for index in range(people):
        email = f"p{index:06d}@x.io"
        people_id = store.create(WEBSITE, {"email": email, "person": {"nickname": f"P{index}"}})
        store.save_data(WEBSITE, people_id, {"plan": "pro"})
        rows.append({"identifier": email, "people_id": people_id, "email": email,
                     "confirmed_at": now(), "person.nickname": f'"P{index}"',
                     **({"data.plan": '"pro"'} if "data.plan" in fields else {})})
    state = StateStore(connect_file(str(template)), "crisp_bench", WEBSITE)
    state.confirm(pl.DataFrame(rows).cast({"confirmed_at": pl.Datetime("us", "UTC")}), fields)
    for row in rows[::200]:
        store.remove(WEBSITE, row["people_id"])
    for row in rows[100::200]:
        store.update(WEBSITE, row["people_id"], {"person": {"nickname": "Edited"}})


def trial(running, template: Path, fields: list[str], consider_listing: bool
          ) -> tuple[int, float, frozenset]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "state.duckdb"
        shutil.copy(template, path)
        connect = connect_file(str(path))
        store = StateStore(connect, "crisp_bench", WEBSITE)
        settings = CrispSettings(website_id=WEBSITE, token_identifier=TOKEN.identifier,
                                 token_key=Secret(TOKEN.key), base_url=running.base_url,
                                 tier="user")
        started = time.perf_counter()
        report = reconcile_snapshot(store, fields, ReconcilePolicy(), "bench", lambda: settings,
                                    ClientOptions(), connect, full=True,
                                    consider_listing=consider_listing)
        seconds = time.perf_counter() - started
        assert report.unanswered == 0 and not report.stopped, report
        drift = store.read("drift").select("identifier", "field", "crisp_value")
        return report.stats.sent, seconds, frozenset(drift.iter_rows())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    config = EmulatorConfig(website_ids=[WEBSITE], tokens=[TOKEN], rate_limit_per_second=None)
    print(f"full reconcile of {args.people:,} managed people (0.5% deleted, 0.5% edited in "
          f"Crisp); median of {args.trials} trials, interleaved\n")
    print(f"{'fields':<28} {'contender':<9} {'requests':>9} {'seconds':>8} {'gone':>5} "
          f"{'edited':>6}")
    for label, fields in (("nickname", ["person.nickname"]),
                          ("nickname + 1 attribute", ["person.nickname", "data.plan"])):
        with start_in_thread(config) as running, tempfile.TemporaryDirectory() as folder:
            template = Path(folder) / "template.duckdb"
            seed(running, args.people, fields, template)
            results: dict[str, list] = {"chosen": [], "lookups": []}
            for _ in range(args.trials):
                for name in results:
                    results[name].append(trial(running, template, fields, name == "chosen"))
            found = {name: {r[2] for r in runs} for name, runs in results.items()}
            assert all(len(f) == 1 for f in found.values()) and \
                found["chosen"] == found["lookups"], "the contenders found different drift"
            drift = next(iter(found["chosen"]))
            gone = sum(1 for _, field, _ in drift if field == "(gone)")
            for name, runs in results.items():
                requests = {r[0] for r in runs}
                assert len(requests) == 1, f"{name}: requests vary between trials: {requests}"
                print(f"{label:<28} {name:<9} {requests.pop():>9,} "
                      f"{statistics.median(r[1] for r in runs):>8.2f} {gone:>5} "
                      f"{len(drift) - gone:>6}")


if __name__ == "__main__":
    main()
