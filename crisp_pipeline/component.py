"""`CrispActivation`, the component a `defs.yaml` instantiates, and its scaffolder.

Its YAML schema is the typed activation model itself (`activation.ActivationConfig`: segment,
identifier, mode as an enum, guards, mirror and reconcile policies with their bounds...) plus
how the assets appear in Dagster (`asset_key_prefix`, `group_name`, `owners`, `tags`,
`kinds`): what editors complete (`dg utils configure-editor`) and `dg check defs` checks is
exactly what the pipeline validates. `post_processing` works as for any component.

The Dagster side lives in `orchestration/`; this module re-exports what users import.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Annotated, Any

import dagster as dg
from pydantic import BaseModel, ConfigDict, Field, field_validator

from crisp_pipeline.activation import ActivationConfig, Mode
from crisp_pipeline.orchestration.assets import AssetPresentation, build_activation_defs
from crisp_pipeline.orchestration.resources import (
    DEFAULT_DB,
    CrispResource,
    CrispRunOptions,
    default_resources,
    pipeline_db,
)

PRESENTATION_FIELDS = ("asset_key_prefix", "group_name", "owners", "tags", "kinds")
NAME_PART = re.compile(r"[A-Za-z0-9_-]+")
GROUP_NAME = re.compile(r"[A-Za-z0-9_]+")
TAG_KEY = re.compile(r"([A-Za-z0-9_.-]{1,63}/)?[A-Za-z0-9_.-]{1,63}")
TAG_VALUE = re.compile(r"[A-Za-z0-9_.-]{0,63}")


class CrispActivationModel(ActivationConfig):
    """A `CrispActivation`'s YAML: the activation (see the README) and how its assets appear
    in Dagster."""

    model_config = ConfigDict(extra="forbid", frozen=True,
                              json_schema_extra={"additionalProperties": False})

    asset_key_prefix: list[str] = Field(
        default_factory=list, description="Parts put before `<name>/<asset>` in every asset "
        "key of the activation, e.g. [crm, crisp].")
    group_name: str | None = Field(
        default=None, description="The asset group (default: the activation's name).")
    owners: list[str] = Field(
        default_factory=list, description="Asset owners: emails or `team:NAME`.")
    tags: dict[str, str] = Field(default_factory=dict, description="Asset tags.")
    kinds: Annotated[list[str], Field(max_length=6)] = Field(
        default_factory=list, description="Extra kinds shown on every asset (e.g. crm).")

    # what Dagster accepts, checked here so that a bad value is refused with the setting's
    # name when the YAML loads, not with a traceback while the assets are built
    @field_validator("asset_key_prefix")
    @classmethod
    def _prefix(cls, parts: list[str]) -> list[str]:
        for part in parts:
            if not NAME_PART.fullmatch(part):
                raise ValueError(f"asset_key_prefix: {part!r}: use letters, digits, _ and -")
        return parts

    @field_validator("group_name")
    @classmethod
    def _group(cls, name: str | None) -> str | None:
        if name is not None and not GROUP_NAME.fullmatch(name):
            raise ValueError(f"group_name: {name!r}: use letters, digits and _")
        return name

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: dict[str, str]) -> dict[str, str]:
        for key, value in tags.items():
            if not TAG_KEY.fullmatch(key) or not TAG_VALUE.fullmatch(value):
                raise ValueError(f"tags: {key!r}: {value!r}: keys and values of at most 63 "
                                 "letters, digits, _, - and . (a key may have one `prefix/`)")
        return tags

    def activation(self) -> ActivationConfig:
        return ActivationConfig.model_validate(
            self.model_dump(exclude=set(PRESENTATION_FIELDS), exclude_unset=True))

    def presentation(self) -> AssetPresentation:
        return AssetPresentation(key_prefix=tuple(self.asset_key_prefix),
                                 group_name=self.group_name, owners=tuple(self.owners),
                                 tags=tuple(sorted(self.tags.items())),
                                 kinds=tuple(self.kinds))


class ScaffoldParams(BaseModel):
    """`dg scaffold defs crisp_pipeline.CrispActivation NAME --mode mirror --table ...`"""

    mode: Mode = Mode.UPSERT
    table: str | None = None
    sql: str | None = None
    identifier: str = "email"
    website_id: str | None = None


class CrispActivationScaffolder(dg.Scaffolder[ScaffoldParams]):
    """Writes a working, commented `defs.yaml`: the activation's name from its folder, the
    source and mode given, and every other setting shown with its default, commented out."""

    @classmethod
    def get_scaffold_params(cls) -> type[ScaffoldParams]:
        return ScaffoldParams

    def scaffold(self, request: dg.ScaffoldRequest[ScaffoldParams]) -> None:
        params = request.params or ScaffoldParams()
        name = Path(request.target_path).name.replace("-", "_").lower()
        Path(request.target_path).mkdir(parents=True, exist_ok=True)
        (Path(request.target_path) / "defs.yaml").write_text(
            scaffolded_yaml(request.type_name, name, params))


def _quoted(text: str) -> str:
    """A YAML scalar holding exactly `text` (a JSON string is one: quotes, colons, `#`,
    newlines and words like `yes` or `null` stay text)."""
    return json.dumps(text, ensure_ascii=False)


def scaffolded_yaml(type_name: str, name: str, params: ScaffoldParams) -> str:
    source = (f"sql: {_quoted(params.sql)}" if params.sql
              else f"table: {_quoted(params.table or 'analytics.customers')}")
    website = (f"website_id: {_quoted(params.website_id)}" if params.website_id
               else "# website_id: ...            # default: CRISP_WEBSITE_ID")
    mirror = "" if params.mode != Mode.MIRROR else textwrap.indent(textwrap.dedent("""\
        # mirror deletes the people it manages who left the segment, within these guards
        guards:
          max_deletes: 500            # per run
          max_delete_fraction: 0.05   # of the people managed, per run and per window
          window_hours: 24
        mirror:
          on_leave: delete            # or: release (stop managing, keep in Crisp)
          delete_adopted: false       # people already in Crisp when found are released
          grace_runs: 0               # runs a person must be absent before leaving
        """), "  ")
    return textwrap.dedent(f"""\
        # A Crisp activation: one segment kept in sync with one Crisp website.
        # Check it with `dg check defs`; see the crisp-pipeline README for every setting.
        type: {type_name}
        attributes:
          name: {_quoted(name)}
          segment:
            {source}
            # warehouse: duckdb         # or postgres, adbc, resource (see the README)
            # watermark_sql: "select max(updated_at) from analytics.customers"
          identifier: {_quoted(params.identifier)}  # or {{external_id: user_id, email: email}}
          mode: {params.mode.value}             # upsert | update_only | mirror
          {website}
          fields:                       # Crisp profile fields <- source columns
            person.nickname: full_name
          attributes: []                # columns sent as Crisp people data, e.g. [plan, mrr]
          # schedule: "0 * * * *"       # a cron schedule (skips while a run is in progress)
        """) + mirror


def pipeline_definitions(db_path: str | None = None) -> dg.Definitions:
    """What a project using `CrispActivation` merges once into its definitions: the
    pipeline's resources (`crisp_db`, `crisp`, `crisp_run`) and the in-process executor.

    The executor matters beyond speed: "Materialize" and "Materialize all" launch the
    code location's implicit job, which otherwise runs each step in its own process (a
    newsletter sync took 54.6 s instead of 3-4 s) and lets an activation's state file be
    opened by several processes at once."""
    return dg.Definitions(resources=default_resources(db_path), executor=dg.in_process_executor)


@dg.scaffold_with(CrispActivationScaffolder)
class CrispActivation(dg.Component):
    """One segment synced to one Crisp website in one mode: four assets (segment,
    crisp_snapshot, change_set, crisp_sync), their checks, a job, and optionally a schedule
    and a source sensor."""

    def __init__(self, model: CrispActivationModel | None = None, **values: Any) -> None:
        self.model = model if model is not None else CrispActivationModel.model_validate(values)
        self.model.activation()  # refuse a bad configuration when the definitions load

    @classmethod
    def get_schema(cls) -> type[CrispActivationModel]:
        return CrispActivationModel

    @classmethod
    def load(cls, attributes: BaseModel | None, context: dg.ComponentLoadContext
             ) -> CrispActivation:
        if isinstance(attributes, CrispActivationModel):
            return cls(attributes)
        values = attributes.model_dump(exclude_unset=True) if attributes is not None else {}
        return cls(CrispActivationModel.model_validate(values))

    def activation(self) -> ActivationConfig:
        return self.model.activation()

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return build_activation_defs(self.model.activation(), self.model.presentation())


__all__ = ["DEFAULT_DB", "AssetPresentation", "CrispActivation", "CrispActivationModel",
           "CrispResource", "CrispRunOptions", "Mode", "build_activation_defs",
           "default_resources", "pipeline_db", "pipeline_definitions"]
