"""crisp-pipeline: keep a warehouse segment of people in sync with Crisp, on Dagster.

`CrispActivation` (the Dagster component) is loaded lazily, so that the client and the
emulator can be used without importing Dagster.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "CrispActivation":
        from .component import CrispActivation

        return CrispActivation
    raise AttributeError(name)
