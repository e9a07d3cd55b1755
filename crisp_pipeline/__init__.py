"""crisp-pipeline: keep a warehouse segment of people in sync with Crisp, on Dagster.

`CrispActivation` is re-exported here so that `type: crisp_pipeline.CrispActivation` in a
`defs.yaml` resolves (dg looks component types up in the registry modules).
"""

from .component import CrispActivation, pipeline_definitions

__version__ = "0.1.0"
__all__ = ["CrispActivation", "pipeline_definitions"]
