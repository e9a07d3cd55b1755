"""What every activation of this project shares: the resources (the DuckDB file, Crisp, the
per-run options) and the in-process executor, so that "Materialize" and "Materialize all"
run an activation as its job does (see `crisp_pipeline.pipeline_definitions`)."""

import dagster as dg

from crisp_pipeline.component import pipeline_definitions


@dg.definitions
def resources() -> dg.Definitions:
    return pipeline_definitions()
