"""Where to reach Crisp and with which token, from the `CRISP_*` environment variables.

The token key is wrapped in `Secret`, whose repr and str are masked, so that printing a
settings object, logging it or putting it in an exception never shows the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import contract


class Secret:
    """A string that does not show itself: repr/str print a mask, `reveal()` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self):  # pickling keeps the value, so copies made by Dagster still work
        return (Secret, (self._value,))


class SettingsError(ValueError):
    """A CRISP_* variable is missing or wrong; the message names the variable."""


@dataclass(frozen=True)
class CrispSettings:
    website_id: str
    token_identifier: str
    token_key: Secret = field(repr=True)
    base_url: str = contract.DEFAULT_BASE_URL
    tier: str = "plugin"
    daily_quota: int | None = None

    def __post_init__(self) -> None:
        if self.tier not in contract.TIERS:
            raise SettingsError(f"CRISP_TIER must be one of {', '.join(contract.TIERS)}, "
                                f"not {self.tier!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise SettingsError(f"CRISP_API_URL must be an http(s) URL, not {self.base_url!r}")
        if not self.base_url.endswith("/"):
            object.__setattr__(self, "base_url", self.base_url + "/")
        if self.daily_quota is None:
            object.__setattr__(self, "daily_quota", contract.DEFAULT_DAILY_QUOTA[self.tier])

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CrispSettings:
        env = os.environ if environ is None else environ
        missing = [name for name in ("CRISP_WEBSITE_ID", "CRISP_TOKEN_IDENTIFIER",
                                     "CRISP_TOKEN_KEY") if not env.get(name)]
        if missing:
            raise SettingsError(f"missing environment variable(s): {', '.join(missing)}")
        return cls(
            website_id=env["CRISP_WEBSITE_ID"],
            token_identifier=env["CRISP_TOKEN_IDENTIFIER"],
            token_key=Secret(env["CRISP_TOKEN_KEY"]),
            base_url=env.get("CRISP_API_URL") or contract.DEFAULT_BASE_URL,
            tier=env.get("CRISP_TIER") or "plugin",
            daily_quota=daily_quota_from_env(env),
        )


def daily_quota_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """CRISP_DAILY_QUOTA, else the default of CRISP_TIER (needs no secret, for planning)."""
    env = os.environ if environ is None else environ
    quota = env.get("CRISP_DAILY_QUOTA")
    if quota:
        if not quota.strip().isdigit():
            raise SettingsError(f"CRISP_DAILY_QUOTA must be a whole number, not {quota!r}")
        return int(quota)
    return contract.DEFAULT_DAILY_QUOTA.get(env.get("CRISP_TIER") or "plugin")
