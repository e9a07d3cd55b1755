"""One activation's job, for test_mirror_trust: run in its own process (two at once, sharing
the DuckDB file), or rebuilt by Dagster for a re-execution from failure.

The activation comes from TRUST_ACTIVATION (its JSON), the DuckDB file from TRUST_DB. As a
script: `python -m crisp_pipeline_tests.concurrent_child RUN_ID [RUN_CONFIG_JSON]` runs the job
once under that run id and prints one JSON line: {"run_id", "success", "failure"}. With
TRUST_GO set to a path, it builds the job, creates `<path>.ready`, and starts the run only once
`<path>` exists: two children can then start runs a fraction of a second apart. With
TRUST_PERSISTENT set, the run is recorded in the instance of $DAGSTER_HOME.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import dagster as dg

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.component import build_activation_defs, default_resources


def job_from_env() -> dg.JobDefinition:
    """The activation's job, as `dg.reconstructable` needs it: built from the environment."""
    config = ActivationConfig.model_validate_json(os.environ["TRUST_ACTIVATION"])
    definitions = dg.Definitions.merge(
        build_activation_defs(config),
        dg.Definitions(resources=default_resources(os.environ["TRUST_DB"])))
    return definitions.resolve_job_def(f"{config.name}_job")


def defs() -> dg.Definitions:
    """The activation's definitions from the environment (for `crisp-pipeline try --module`)."""
    config = ActivationConfig.model_validate_json(os.environ["TRUST_ACTIVATION"])
    return dg.Definitions.merge(
        build_activation_defs(config),
        dg.Definitions(resources=default_resources(os.environ["TRUST_DB"])))


def reconstructable_job() -> dg.ReconstructableJob:
    """`dg.reconstructable(job_from_env)` as the environment says now. Dagster keeps the last
    job it reconstructed (`ReconstructableJob.get_definition` is an lru_cache keyed by the
    code pointer, the same for every test): without forgetting it, a second test in the
    process would run the first test's job, its resources and its warehouse file included."""
    from dagster._core.definitions.reconstruct import ReconstructableJob

    ReconstructableJob.get_definition.cache_clear()
    ReconstructableJob.get_repository_definition.cache_clear()
    return dg.reconstructable(job_from_env)


def failure_text(result) -> str:
    return "\n".join(
        event.step_failure_data.error.message if event.step_failure_data.error
        else str(event.step_failure_data.user_failure_data)
        for event in result.all_events if event.is_step_failure)


if __name__ == "__main__":
    run_id = sys.argv[1]
    run_config = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    run_config.setdefault("loggers", {"console": {"config": {"log_level": "ERROR"}}})
    try:
        job = job_from_env()
        go = os.environ.get("TRUST_GO")
        if go:
            Path(go + ".ready").touch()
            deadline = time.monotonic() + 120
            while not Path(go).exists() and time.monotonic() < deadline:
                time.sleep(0.005)
        if os.environ.get("TRUST_PERSISTENT"):  # the instance of $DAGSTER_HOME, as dg dev's
            with dg.DagsterInstance.get() as instance:
                result = job.execute_in_process(raise_on_error=False, run_id=run_id,
                                                run_config=run_config, instance=instance)
        else:
            result = job.execute_in_process(raise_on_error=False, run_id=run_id,
                                            run_config=run_config)
        outcome = {"run_id": run_id, "success": result.success, "failure": failure_text(result)}
    except Exception as error:  # noqa: BLE001 - reported to the test, which decides
        outcome = {"run_id": run_id, "success": False,
                   "failure": f"{type(error).__name__}: {error}"}
    print(json.dumps(outcome), flush=True)
