"""Runs one activation's job in this process, to be killed by test_crash_safety."""

import os
import sys

import dagster as dg

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.component import build_activation_defs, default_resources

if __name__ == "__main__":
    config = ActivationConfig.model_validate_json(os.environ["CRASH_ACTIVATION"])
    definitions = dg.Definitions.merge(build_activation_defs(config),
                                       dg.Definitions(resources=default_resources(sys.argv[1])))
    job = definitions.resolve_job_def(f"{config.name}_job")
    job.execute_in_process(raise_on_error=False,
                           run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
