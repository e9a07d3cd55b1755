"""Everything under defs/, and what every CrispActivation needs once per project: the
pipeline's resources and the in-process executor (`crisp_pipeline.pipeline_definitions`)."""

from pathlib import Path

import dagster as dg

from crisp_pipeline import pipeline_definitions


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        pipeline_definitions())
