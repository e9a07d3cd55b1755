"""An activation wired to the emulator and a temporary DuckDB file (its warehouse, and its state
unless the `state_backend` fixture put the state in Postgres), run through Dagster."""

from __future__ import annotations

import duckdb
import dagster as dg
import polars as pl
import pytest

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.component import build_activation_defs, default_resources
from crisp_pipeline.changes.encode import same_value
from crisp_pipeline.emulator import RunningEmulator
from crisp_pipeline.orchestration.metadata import refusal_of
from crisp_pipeline.state.store import StateStore, connect_state
from crisp_pipeline.sync.profiles import held_values

from .conftest import PLUGIN, WEBSITE

WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def crisp_env(monkeypatch: pytest.MonkeyPatch, emulator: RunningEmulator, token=PLUGIN,
              website: str = WEBSITE) -> None:
    for name, value in {"CRISP_API_URL": emulator.base_url, "CRISP_WEBSITE_ID": website,
                        "CRISP_TOKEN_IDENTIFIER": token.identifier, "CRISP_TOKEN_KEY": token.key,
                        "CRISP_TIER": token.tier}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CRISP_DAILY_QUOTA", raising=False)


class Pipeline:
    def __init__(self, emulator: RunningEmulator, db_path: str, config: ActivationConfig,
                 instance: dg.DagsterInstance | None = None,
                 resources: dict | None = None) -> None:
        """`resources`: the user's own, beside the pipeline's (e.g. a warehouse resource)."""
        self.emulator = emulator
        self.db_path = db_path
        self.config = config
        self.instance = instance or dg.DagsterInstance.ephemeral()
        self.defs = dg.Definitions.merge(
            build_activation_defs(config),
            dg.Definitions(resources={**default_resources(db_path), **(resources or {})}))
        self.job = self.defs.resolve_job_def(f"{config.name}_job")
        self.store = StateStore(connect_state(db_path), config.state_schema,
                                config.website_id or WEBSITE)
        self.fields = list(config.managed_columns)
        self._log_mark = 0

    def load(self, rows: list[dict] | pl.DataFrame, table: str = "people",
             schema: dict | None = None) -> None:
        frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(rows, schema=schema)
        connection = duckdb.connect(self.db_path)
        try:
            connection.register("source_rows", frame.to_arrow())
            connection.execute(f"create or replace table {table} as select * from source_rows")
        finally:
            connection.close()

    def run(self, *, dry_run: bool = False, override_guards: bool = False,
            expect_success: bool | None = True, **options: object
            ) -> dg.ExecuteInProcessResult:
        self._log_mark = len(self.emulator.emulator.requests())
        result = self.job.execute_in_process(
            instance=self.instance, raise_on_error=False,
            run_config={"resources": {"crisp_run": {"config": {
                "dry_run": dry_run, "override_guards": override_guards, **options}}}})
        if expect_success is not None:
            assert result.success is expect_success, self.failure_text(result)
        return result

    @staticmethod
    def failure_text(result: dg.ExecuteInProcessResult) -> str:
        failures = [event.step_failure_data.error.message if event.step_failure_data.error
                    else str(event.step_failure_data.user_failure_data)
                    for event in result.all_events if event.is_step_failure]
        return "\n".join(failures) or "no step failure"

    def requests_of_last_run(self) -> list:
        return self.emulator.emulator.requests()[self._log_mark:]

    def writes_of_last_run(self) -> int:
        return sum(1 for entry in self.requests_of_last_run() if entry.method in WRITES)

    def crisp(self, website: str = WEBSITE) -> dict[str, dict]:
        """email -> {profile fields, data} of every person in the emulated Crisp website."""
        return {person["email"]: person for person in self.emulator.emulator.people(website)}

    def snapshot(self) -> pl.DataFrame:
        return self.store.read_snapshot(self.fields)

    def assert_snapshot_matches_crisp(self, website: str = WEBSITE) -> None:
        """Every managed person's confirmed values are what Crisp holds, field by field."""
        by_id = {p["people_id"]: p for p in self.emulator.emulator.people(website)}
        for row in self.snapshot().to_dicts():
            person = by_id.get(row["people_id"])
            assert person is not None, f"snapshot claims {row['identifier']}, Crisp has no such person"
            held = held_values(person, person["data"], self.fields)
            for field in self.fields:
                if row[field] is not None:  # the same value for Crisp (numbers: doubles)
                    assert same_value(row[field], held[field]), (
                        row["identifier"], field, row[field], held[field])

    def metadata(self, result: dg.ExecuteInProcessResult, asset: str) -> dict:
        materializations = result.asset_materializations_for_node(f"{self.config.name}__{asset}")
        return {k: v.value for k, v in materializations[0].metadata.items()} if materializations else {}

    def checks(self, result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
        return {e.check_name: e for e in result.get_asset_check_evaluations()}

    def refusal(self, result: dg.ExecuteInProcessResult) -> str | None:
        """Why the run's sync was refused (mirror's guards), or None: a refused run succeeds,
        materializes no sync and says why in an observation of `crisp_sync`."""
        return refusal_of(result, self.config.name)
