"""Telling someone: a failed run, a partly failed sync, a guard refusal, a budget that ran out
before the work was done.

One destination, a webhook: its URL comes from the environment variable the `CrispAlerts`
resource names (default CRISP_ALERT_WEBHOOK_URL; a Slack incoming-webhook URL works as it is,
since the message's `text` is what Slack shows). Each alert is one JSON POST:
`{"text", "event", "activation", "run_id", "run_url", "counts"}`. Sending is best effort: an
alert that cannot be delivered is logged, never fails the run (the run's own outcome stands).
No Dagster import here: the resource and the sensor live in `orchestration/`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import httpx

log = logging.getLogger(__name__)

DEFAULT_URL_ENV = "CRISP_ALERT_WEBHOOK_URL"
EVENTS = ("run_failed", "sync_partly_failed", "guard_refused", "budget_exhausted")


@dataclass(frozen=True)
class Alert:
    event: str  # one of EVENTS
    activation: str
    summary: str  # one sentence
    run_id: str | None = None
    run_url: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def text(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        parts = [f"crisp-pipeline · {self.activation} · {self.event.replace('_', ' ')}: "
                 f"{self.summary}"]
        if counts:
            parts.append(counts)
        if self.run_url:
            parts.append(self.run_url)
        return "\n".join(parts)

    def payload(self) -> dict[str, object]:
        return {"text": self.text, "event": self.event, "activation": self.activation,
                "run_id": self.run_id, "run_url": self.run_url, "counts": self.counts}


def run_url(webserver_url: str | None, run_id: str | None) -> str | None:
    if not webserver_url or not run_id:
        return None
    return f"{webserver_url.rstrip('/')}/runs/{run_id}"


def send(alert: Alert, url_env: str = DEFAULT_URL_ENV, timeout: float = 10.0) -> bool:
    """POST the alert to the webhook of `url_env`; False (logged, URL never shown) when it is
    not set or not delivered."""
    url = os.environ.get(url_env, "").strip()
    if not url:
        return False
    try:
        response = httpx.post(url, json=alert.payload(), timeout=timeout)
    except Exception as error:  # noqa: BLE001 - an alert never fails the run
        # (the error's text may quote the URL, normalised past what redaction recognises)
        log.warning("alert %s for %s not delivered: %s (the webhook of %s)", alert.event,
                    alert.activation, type(error).__name__, url_env)
        return False
    if response.is_error:
        log.warning("alert %s for %s not delivered: the webhook of %s answered %s",
                    alert.event, alert.activation, url_env, response.status_code)
        return False
    return True


def sync_alerts(activation: str, metadata: dict[str, object], *, run_id: str,
                webserver_url: str | None, failed_share: float) -> list[Alert]:
    """What a finished sync should tell: writes refused or deferred beyond `failed_share` of
    the people it handled, and a budget that ran out with work left."""
    ok = int(metadata.get("people_ok") or 0)
    rejected = int(metadata.get("people_rejected") or 0)
    deferred = int(metadata.get("people_deferred") or 0)
    handled = ok + rejected + deferred
    counts = {"ok": ok, "rejected": rejected, "deferred": deferred}
    link = run_url(webserver_url, run_id)
    alerts = []
    because = str(metadata.get("deferred_because") or "")
    if "budget" in because and deferred:
        alerts.append(Alert("budget_exhausted", activation,
                            f"the daily request budget ran out with {deferred} people left; "
                            "they go out on the next run", run_id, link, counts))
    if handled and (rejected + deferred) / handled > failed_share and not (
            alerts and not rejected):
        alerts.append(Alert("sync_partly_failed", activation,
                            f"{rejected} write(s) refused and {deferred} deferred of {handled} "
                            "(table `outcomes` says why)", run_id, link, counts))
    return alerts
