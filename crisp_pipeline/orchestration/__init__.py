"""The Dagster side of crisp-pipeline: resources, the run's scope (lock, state kept open),
the asset factory, what the UI shows, automation. Everything here is thin: reading, diffing,
adopting and sending live in `changes/`, `state/` and `sync/`, which do not import Dagster."""
