"""The `crisp-pipeline` command line."""

from __future__ import annotations

from pathlib import Path

import click

from crisp_pipeline.crisp import contract


@click.group()
@click.version_option(package_name="crisp-pipeline")
def main() -> None:
    """Keep a warehouse segment of people in sync with Crisp."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8780, show_default=True, type=int, help="Port (0: any free one).")
@click.option("--website-id", "website_ids", multiple=True, required=True,
              help="A website the token may use (repeatable).")
@click.option("--token", "tokens", multiple=True, required=True, metavar="ID:KEY",
              help="A token pair the emulator accepts (repeatable).")
@click.option("--tier", type=click.Choice(contract.TIERS), default="plugin", show_default=True,
              help="Tier of the tokens; requests must send it in X-Crisp-Tier.")
@click.option("--daily-quota", type=int, default=None,
              help="Requests per token per UTC day [default: 5000 plugin, 10000 website].")
@click.option("--rate-limit", type=float, default=500.0, show_default=True,
              help="Requests per second per token before 429 (0: no limit).")
@click.option("--rate-limit-status", type=click.Choice(["429", "420"]), default="429",
              show_default=True, help="Status answered when rate limited.")
@click.option("--retry-after/--no-retry-after", default=False, show_default=True,
              help="Send Retry-After on 429 (real Crisp does not).")
@click.option("--latency-ms", type=float, default=0.0, show_default=True,
              help="Latency added to every request.")
@click.option("--latency-jitter-ms", type=float, default=0.0, show_default=True,
              help="Random latency added on top, up to this much.")
@click.option("--fault-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fraction of requests answered 500/503 without being processed.")
@click.option("--drop-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fraction of requests whose connection drops.")
@click.option("--state", "state_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="JSON file that keeps people across restarts.")
@click.option("--seed", type=int, default=None, help="Seed for ids and fault draws.")
@click.option("--admin-key", default=None, envvar="CRISP_EMULATOR_ADMIN_KEY",
              help="Enables the /_emulator admin API for this key.")
def emulator(host: str, port: int, website_ids: tuple[str, ...], tokens: tuple[str, ...],
             tier: str, daily_quota: int | None, rate_limit: float, rate_limit_status: str,
             retry_after: bool, latency_ms: float, latency_jitter_ms: float, fault_rate: float,
             drop_rate: float, state_file: Path | None, seed: int | None,
             admin_key: str | None) -> None:
    """Serve the local Crisp people API emulator until interrupted."""
    from crisp_pipeline.emulator import EmulatorConfig, FaultPlan, TokenSpec, serve_forever

    try:
        specs = [TokenSpec.parse(pair, tier, daily_quota) for pair in tokens]
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--token") from None
    config = EmulatorConfig(
        website_ids=list(website_ids), tokens=specs,
        rate_limit_per_second=rate_limit or None, rate_limit_status=int(rate_limit_status),
        retry_after_header=retry_after, seed=seed, state_file=state_file, admin_key=admin_key,
        faults=FaultPlan(latency_ms=latency_ms, latency_jitter_ms=latency_jitter_ms,
                         error_rate=fault_rate, drop_rate=drop_rate),
    )
    shown_port = port or "a free port"
    click.echo(f"Crisp emulator on http://{host}:{shown_port}/v1/ for website(s) "
               f"{', '.join(website_ids)}; token(s) {', '.join(s.identifier for s in specs)} "
               f"({tier} tier). Ctrl-C stops it.")
    serve_forever(config, host, port)


if __name__ == "__main__":
    main()
