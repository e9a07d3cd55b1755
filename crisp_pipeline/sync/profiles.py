"""Between managed fields and Crisp's JSON: profile bodies from changed values, and the JSON
text of what Crisp holds for a person we adopt. (People-data bodies come ready-made from the
change set's `data_values`.)"""

from __future__ import annotations

from typing import Any

from crisp_pipeline.changes import fields as crisp_fields
from crisp_pipeline.changes.encode import encode_value
from crisp_pipeline.crisp import contract


def profile_body(values: dict[str, Any], *, email: str | None = None,
                 creating: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The ProfileWrite body for the profile fields among `values`, and the fields it carries.

    A null clears: strings are written as "" and segments as []. An integer field cannot be
    cleared (Crisp takes no empty integer), so a null integer is not sent and not confirmed.
    """
    body: dict[str, Any] = {}
    sent: list[str] = []
    for field, value in values.items():
        if crisp_fields.is_data_field(field):
            continue
        kind = crisp_fields.kind_of(field)
        if value is None:
            if kind == crisp_fields.INTEGER:
                continue
            value = [] if kind == crisp_fields.SEGMENTS else ""
        target = body
        *parents, leaf = field.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
        sent.append(field)
    if email is not None:
        body["email"] = email
    if creating and contract.NICKNAME_REQUIRED_ON_CREATE and not body.get("person", {}).get("nickname"):
        # Crisp wants a nickname on create; the email's local part stands in for it.
        body.setdefault("person", {})["nickname"] = (email or "person").split("@")[0]
    return body, sent


def held_values(profile: dict[str, Any], data: dict[str, Any] | None,
                fields: list[str]) -> dict[str, str]:
    """The JSON text of each managed field as Crisp holds it (for adopted people).

    Data fields are left out when `data` was not read (None): unknown, not empty.
    """
    held: dict[str, str] = {}
    for field in fields:
        if crisp_fields.is_data_field(field):
            if data is None:
                continue
            value = data.get(crisp_fields.data_key(field))
        else:
            value: Any = profile
            for part in field.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if field == "segments":
                value = sorted({s.lower() for s in value}) if value else None
        held[field] = encode_value(None if value in ("", []) else value)
    return held
