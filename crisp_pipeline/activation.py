"""An activation: one segment synced to one Crisp website in one mode.

This is the configuration a user writes (in a `defs.yaml`, see `component.py`, or in Python),
checked when the definitions load: unknown modes, Crisp fields that do not exist and attribute
names Crisp refuses as people-data keys are errors whose message names the fix. What can only
be checked against the data (a column missing from the segment, a column of a type Crisp cannot
hold) is checked when the segment is read, before any request is sent.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from crisp_pipeline.changes import fields as crisp_fields
from crisp_pipeline.crisp import contract
from crisp_pipeline.names import Phase

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


class Mode(StrEnum):
    UPSERT = "upsert"  # create unknown people, update known ones, never delete
    UPDATE_ONLY = "update_only"  # update people already in Crisp, never create, never delete
    MIRROR = "mirror"  # create, update, and delete the managed people who left the segment


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DEFAULT_URI_ENV = "CRISP_WAREHOUSE_URI"


class SegmentQuery(_Model):
    """Where the segment's rows come from: a SQL query or a table (one of the two)."""

    sql: str | None = None
    table: str | None = None
    watermark_sql: str | None = Field(
        default=None, description="A cheap query whose single value changes when the source "
        "does (e.g. `select max(updated_at) from customers`); drives the source sensor.")
    warehouse: Literal["duckdb", "postgres", "adbc", "resource"] = Field(
        default="duckdb", description="Where the query runs: `duckdb` (the pipeline's own "
        "file, CRISP_PIPELINE_DB), `postgres`, `adbc` (any database with an ADBC driver: "
        "name it in `adbc_driver`), or `resource` (a warehouse resource of your Dagster "
        "project, e.g. dagster-snowflake's SnowflakeResource: name its key in "
        "`resource_key`).")
    resource_key: str | None = Field(
        default=None, description="With `warehouse: resource`, the key your Definitions bind "
        "the warehouse resource to (e.g. `snowflake`); its credentials stay in that resource.")
    uri_env: str | None = Field(
        default=None, description="The environment variable holding the warehouse's "
        "connection URI, credentials included (never the URI itself: YAML is not a place "
        f"for secrets). Default: {DEFAULT_URI_ENV}.")
    adbc_driver: str | None = Field(
        default=None, description="With `warehouse: adbc`, the driver's Python module, e.g. "
        "`adbc_driver_snowflake` or `adbc_driver_bigquery`.")
    timeout_seconds: Annotated[float, Field(gt=0, le=86_400)] | None = Field(
        default=None, description="Cancel a segment or watermark query running longer "
        "(postgres and adbc).")
    upstream: list[str] | None = Field(
        default=None, description="The asset key (as a list of parts) of what the segment "
        "reads, e.g. your dbt model `[analytics, paying_customers]`: the graph then runs "
        "from your own lineage into the segment. Without it, the table (or the query) is "
        "declared as an external asset upstream of the segment.")

    @model_validator(mode="after")
    def _one_source(self) -> SegmentQuery:
        if bool(self.sql) == bool(self.table):
            raise ValueError("segment: give exactly one of `sql` or `table`")
        if self.warehouse == "duckdb" and (self.uri_env or self.adbc_driver):
            raise ValueError("segment: a DuckDB segment is read from the pipeline's own file "
                             "(CRISP_PIPELINE_DB): `uri_env` and `adbc_driver` are for "
                             "`warehouse: postgres` or `adbc`")
        if self.uri_env and "://" in self.uri_env:
            raise ValueError("segment.uri_env names the environment variable that holds the "
                             "connection URI, not the URI: keep credentials out of YAML")
        if self.uri_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.uri_env):
            raise ValueError(f"segment.uri_env: {self.uri_env!r} is not an environment "
                             "variable name")
        if self.warehouse == "resource":
            if not self.resource_key or not re.fullmatch(r"[A-Za-z_]\w*", self.resource_key):
                raise ValueError("segment: `warehouse: resource` needs `resource_key`, the key "
                                 "of your warehouse resource (e.g. snowflake)")
            if self.uri_env or self.adbc_driver:
                raise ValueError("segment: a `resource` segment connects through the resource: "
                                 "`uri_env` and `adbc_driver` are for `postgres` or `adbc`")
            if self.resource_key in ("crisp_db", "crisp", "crisp_run"):
                raise ValueError(f"segment.resource_key: {self.resource_key!r} is one of the "
                                 "pipeline's own resources; name your warehouse resource")
            if self.timeout_seconds is not None:
                raise ValueError("segment.timeout_seconds: a `resource` segment's queries run "
                                 "as the resource runs them; set the timeout there (e.g. "
                                 "Snowflake's STATEMENT_TIMEOUT_IN_SECONDS)")
        elif self.resource_key:
            raise ValueError("segment.resource_key is for `warehouse: resource`")
        if self.warehouse == "adbc" and not self.adbc_driver:
            raise ValueError("segment: `warehouse: adbc` needs `adbc_driver`, the driver's "
                             "Python module (e.g. adbc_driver_snowflake)")
        if self.adbc_driver and not re.fullmatch(r"[A-Za-z_][\w.]*", self.adbc_driver):
            raise ValueError(f"segment.adbc_driver: {self.adbc_driver!r} is not a module name")
        if self.warehouse in ("postgres", "adbc") and not self.uri_env:
            object.__setattr__(self, "uri_env", DEFAULT_URI_ENV)
        if self.upstream is not None and not self.upstream:
            raise ValueError("segment.upstream: give the asset key's parts, e.g. "
                             "[analytics, customers]")
        if self.table and not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*){0,2}", self.table):
            raise ValueError(f"segment.table: {self.table!r} is not a table name "
                             "(use `schema.table`, or `sql:` for anything else)")
        return self


class ExternalIdentifier(_Model):
    """People are keyed by an external id; the email column is still needed to create them."""

    external_id: str
    email: str


class Guards(_Model):
    """Mirror refuses to delete more than this, in one run and over a rolling window, unless
    the run overrides it. The window counts the deletions already done in the last
    `window_hours` together with the run's, so a source that loses a few people each run
    cannot delete many people a little at a time (0 turns the window off)."""

    max_deletes: Annotated[int, Field(ge=0)] = 500
    max_delete_fraction: Annotated[float, Field(ge=0, le=1)] = 0.05
    window_hours: Annotated[float, Field(ge=0)] = 24.0


class MirrorPolicy(_Model):
    """What leaving the segment means for a mirror.

    - `on_leave`: `delete` (Crisp forgets the person, permanently) or `release` (we stop
      managing them; Crisp keeps them as they are);
    - `delete_adopted`: whether people who were already in Crisp before the activation found
      them (adopted, not created by it) may be deleted; when false they are released;
    - `grace_runs` / `grace_hours`: a person is deleted only once absent from this many runs
      in a row (2: not on the first absent run, on the second) and for this long.
    A person another activation on the same website still holds is always released.
    """

    on_leave: Literal["delete", "release"] = "delete"
    delete_adopted: bool = False
    grace_runs: Annotated[int, Field(ge=0)] = 0
    grace_hours: Annotated[float, Field(ge=0)] = 0.0


class ReconcilePolicy(_Model):
    """How much a run may spend re-reading Crisp to correct its snapshot (people deleted or
    edited in Crisp behind our back), oldest-verified people first.

    A person is due once `verify_every_hours` have passed since Crisp last showed them to us
    (a read, or an answer about that very person). A run spends at most `budget_share` of the
    requests the token has left today on due people, and never more than `max_requests` (0 in
    either turns the rolling reconcile off; a full reconcile asked for in the run config or
    the CLI reads everyone, due or not). Listing the website costs about one request per 50
    people; reading a person's people data costs one each.
    """

    verify_every_hours: Annotated[float, Field(ge=0)] = 24.0
    budget_share: Annotated[float, Field(ge=0, le=1)] = 0.1
    max_requests: Annotated[int, Field(ge=0)] = 500


class Attribute(_Model):
    """A column written as Crisp people data, optionally under another key."""

    column: str
    key: str

    @model_validator(mode="after")
    def _valid_key(self) -> Attribute:
        if not contract.is_valid_data_key(self.key):
            raise ValueError(f"attribute key {self.key!r} is not a valid Crisp people-data key "
                             "(1-64 characters of a-z, 0-9, '_' and '-'); "
                             f"try {contract.suggest_data_key(self.key)!r}")
        return self




class ActivationConfig(_Model):
    name: str
    segment: SegmentQuery
    identifier: str | ExternalIdentifier = "email"
    mode: Mode = Mode.UPSERT
    fields: dict[str, str] = Field(default_factory=dict)
    attributes: list[str | Attribute] = Field(default_factory=list)
    website_id: str | None = Field(
        default=None, description="The Crisp website; CRISP_WEBSITE_ID when not set.")
    schedule: str | None = None
    guards: Guards = Field(default_factory=Guards)
    mirror: MirrorPolicy = Field(default_factory=MirrorPolicy)
    reconcile: ReconcilePolicy = Field(default_factory=ReconcilePolicy)
    order: tuple[Phase, Phase, Phase] = Field(
        default=("delete", "update", "create"),
        description="The order in which a run spends its requests; when the daily budget "
        "runs out, what comes last waits for the next run.",
        # (a plain array in the YAML schema: editors and dg's sample YAML read `items`)
        json_schema_extra={"items": {"enum": ["delete", "update", "create"]}})
    batch_size: Annotated[int, Field(ge=1, le=contract.MAX_BATCH_PROFILES)] = \
        contract.MAX_BATCH_PROFILES
    history_days: Annotated[float, Field(ge=0)] = Field(
        default=90.0, description="How long the history tables (`change_set_history`, "
        "`outcomes`, `runs`, `drift`) keep their rows; 0 keeps them forever. The audit of "
        "deletions (`deletions`) is always kept.")

    @field_validator("order")
    @classmethod
    def _order(cls, order: tuple[str, str, str]) -> tuple[str, str, str]:
        if sorted(order) != ["create", "delete", "update"]:
            raise ValueError("order: list delete, update and create once each")
        return order

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"name {name!r}: use lower-case letters, digits and '_' "
                             "(it names asset keys and a DuckDB schema)")
        return name

    @field_validator("fields")
    @classmethod
    def _fields(cls, fields: dict[str, str]) -> dict[str, str]:
        for path in fields:
            if path not in crisp_fields.PROFILE_FIELDS:
                known = ", ".join(sorted(crisp_fields.PROFILE_FIELDS))
                hint = (" (the identity is set with `identifier`)" if path == "email" else
                        " (people data go under `attributes`)" if path.startswith("data") else "")
                raise ValueError(f"fields: {path!r} is not a Crisp profile field{hint}; "
                                 f"known fields: {known}")
        return fields

    @field_validator("attributes")
    @classmethod
    def _attributes(cls, attributes: list[str | Attribute]) -> list[str | Attribute]:
        for attribute in attributes:
            if isinstance(attribute, str) and not contract.is_valid_data_key(attribute):
                suggestion = contract.suggest_data_key(attribute)
                raise ValueError(
                    f"attributes: column {attribute!r} is not a valid Crisp people-data key "
                    "(1-64 characters of a-z, 0-9, '_' and '-'); rename it in the segment "
                    f"(`{attribute} as {suggestion}`) or map it explicitly: "
                    f"{{column: {attribute!r}, key: {suggestion!r}}}")
        return attributes

    @model_validator(mode="after")
    def _no_key_twice(self) -> ActivationConfig:
        keys = [attribute if isinstance(attribute, str) else attribute.key
                for attribute in self.attributes]
        if isinstance(self.identifier, ExternalIdentifier):
            keys.append(contract.suggest_data_key(self.identifier.external_id))
        duplicates = {key for key in keys if keys.count(key) > 1}
        if duplicates:
            raise ValueError(f"attributes: key(s) {sorted(duplicates)} are written twice")
        return self

    # ---------------------------------------------------------------- derived views

    @property
    def identifier_column(self) -> str:
        return self.identifier if isinstance(self.identifier, str) else self.identifier.external_id

    @property
    def email_column(self) -> str:
        return self.identifier if isinstance(self.identifier, str) else self.identifier.email

    @property
    def keyed_by_email(self) -> bool:
        return isinstance(self.identifier, str)

    @property
    def data_columns(self) -> dict[str, str]:
        """Managed people-data field (`data.<key>`) -> segment column. With an external id,
        the id itself is written to people data too, so that it is visible in Crisp."""
        columns = {}
        if isinstance(self.identifier, ExternalIdentifier):
            columns[crisp_fields.data_field(contract.suggest_data_key(
                self.identifier.external_id))] = self.identifier.external_id
        for attribute in self.attributes:
            column, key = ((attribute, attribute) if isinstance(attribute, str)
                           else (attribute.column, attribute.key))
            columns[crisp_fields.data_field(key)] = column
        return columns

    @property
    def managed_columns(self) -> dict[str, str]:
        """Every field this activation writes -> the segment column it comes from. (Under an
        external id the email is written too when it changes; the diff handles it.)"""
        return {**self.fields, **self.data_columns}

    @property
    def source_columns(self) -> list[str]:
        columns = [self.identifier_column, self.email_column, *self.managed_columns.values()]
        return list(dict.fromkeys(columns))

    @property
    def state_schema(self) -> str:
        return f"crisp_{self.name}"

    def resolved_website_id(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The website this activation writes to: `website_id`, else CRISP_WEBSITE_ID."""
        env = os.environ if environ is None else environ
        return self.website_id or env.get("CRISP_WEBSITE_ID") or None

    def identity(self, website_id: str | None) -> dict[str, object]:
        """What the state must remember of this configuration to notice a change: the
        website, the identifier, the mode and the managed fields (with their columns)."""
        return {"website_id": website_id,
                "identifier": (self.identifier if isinstance(self.identifier, str)
                               else self.identifier.model_dump()),
                "mode": self.mode.value, "fields": self.managed_columns}
