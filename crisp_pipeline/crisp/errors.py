"""What can go wrong talking to Crisp, sorted by what the caller should do about it.

The sync acts on the class, never on a status code: a `RetryLater` defers the row to the next
run, a `RowRejected` records the row's failure with Crisp's reason and message and moves on,
a `StopRun` ends the run at once. No message ever includes credentials: errors are built from
the method, the route path (which never holds the key) and Crisp's own answer.
"""

from __future__ import annotations

from . import contract


class CrispError(Exception):
    """An answer or failure from Crisp, with the parts a person needs to act on it."""

    def __init__(self, method: str, path: str, status: int | None, reason: str,
                 message: str | None = None) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(self._describe())

    def _describe(self) -> str:
        status = f"{self.status} " if self.status is not None else ""
        detail = f": {self.message}" if self.message else ""
        return f"{self.method} {self.path} -> {status}{self.reason}{detail}"


class RetryLater(CrispError):
    """Crisp is limiting, failing or unreachable; the same request may succeed later."""

    def __init__(self, method: str, path: str, status: int | None, reason: str,
                 message: str | None = None, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(method, path, status, reason, message)


class RowRejected(CrispError):
    """Crisp refused this one request (bad data, conflict, unknown person); others may pass."""


class StopRun(CrispError):
    """Credentials, tier or website are wrong: no request of this run can succeed."""

    def _describe(self) -> str:
        hint = {
            401: "check CRISP_TOKEN_IDENTIFIER, CRISP_TOKEN_KEY and CRISP_TIER",
            403: "the token lacks a scope for this route; check the plugin's scopes",
            404: "check CRISP_WEBSITE_ID (is the plugin installed on this website?)",
        }.get(self.status or 0, "check the CRISP_* settings")
        return f"{super()._describe()} ({hint})"


class BudgetExhausted(RetryLater):
    """The daily request budget is spent; the request was not sent."""

    def __init__(self, method: str, path: str, remaining: int | None,
                 unavailable: str | None = None) -> None:
        if unavailable:  # the budget's store cannot be reached: nothing may be sent unpaid
            super().__init__(method, path, None, "state_unavailable",
                             f"the request budget cannot be paid ({unavailable}); the request "
                             "was not sent and will go out on a later run")
            return
        super().__init__(method, path, None, "budget_exhausted",
                         f"the daily request budget is spent ({remaining or 0} left); "
                         "the request was not sent and will go out on a later run")


def classify(method: str, path: str, status: int, reason: str, message: str | None,
             retry_after: float | None = None) -> CrispError:
    """The error class for a non-2xx answer (the taxonomy lives here and nowhere else)."""
    if reason in contract.STOP_RUN_REASONS or status in contract.STOP_RUN_STATUSES:
        return StopRun(method, path, status, reason, message)
    if status in contract.RETRY_LATER_STATUSES or status >= 500:
        return RetryLater(method, path, status, reason, message, retry_after)
    return RowRejected(method, path, status, reason, message)
