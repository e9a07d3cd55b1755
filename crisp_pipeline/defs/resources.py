"""The resources every activation uses: the DuckDB file, Crisp, and the per-run options."""

import dagster as dg

from crisp_pipeline.component import default_resources


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=default_resources())
