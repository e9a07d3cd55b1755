"""The Crisp people API client: settings, errors, pacing. No Dagster, no Polars."""

from .client import CrispClient, RetryPolicy
from .config import CrispSettings, Secret, SettingsError
from .errors import BudgetExhausted, CrispError, RetryLater, RowRejected, StopRun
from .pacing import InMemoryBudget, RequestBudget, RequestStats, UnlimitedBudget

__all__ = [
    "BudgetExhausted", "CrispClient", "CrispError", "CrispSettings", "InMemoryBudget",
    "RequestBudget", "RequestStats", "RetryLater", "RetryPolicy", "RowRejected", "Secret",
    "SettingsError", "StopRun", "UnlimitedBudget",
]
