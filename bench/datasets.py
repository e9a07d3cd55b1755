"""Synthetic segments and snapshots for the benchmarks: N people x K attributes, with a given
share of changed, new and gone people. Values are already in the pipeline's JSON-text form,
as the normalised segment and the stored snapshot hold them."""

from __future__ import annotations

import argparse

import numpy as np
import polars as pl

from crisp_pipeline.activation import ActivationConfig


def bench_arguments(doc: str, repeats: str = "trials",
                    at_least: int | None = None) -> argparse.Namespace:
    """The command line every benchmark of a segment takes: its size (`--people`,
    `--attributes`) and how many timed repeats (`--<repeats>`, 5 by default)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=1_000_000)
    parser.add_argument("--attributes", type=int, default=20)
    parser.add_argument(f"--{repeats}", type=int, default=5)
    args = parser.parse_args()
    if at_least is not None and getattr(args, repeats) < at_least:
        parser.error(f"--{repeats}: at least {at_least}")
    return args


def config_for(attributes: int) -> ActivationConfig:
    return ActivationConfig(name="bench", segment={"table": "people"},
                            attributes=[f"attr_{i:02d}" for i in range(attributes)])


def make_frames(people: int, attributes: int, changed: float = 0.05, new: float = 0.02,
                gone: float = 0.02, seed: int = 1) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(segment, snapshot): the snapshot holds last run's values; the segment has `changed`
    of them with one attribute changed, `new` people added and `gone` people removed."""
    rng = np.random.default_rng(seed)
    fields = [f"data.attr_{i:02d}" for i in range(attributes)]
    previous = pl.DataFrame({
        "n": np.arange(people), **{f: rng.integers(0, 1000, people) for f in fields},
    }).select(pl.format("person{}@example.com", "n").alias("identifier"),
              *[pl.format('"v{}"', pl.col(f)).alias(f) for f in fields])
    n_gone, n_new, n_changed = int(people * gone), int(people * new), int(people * changed)
    snapshot = previous.with_columns(
        pl.format("pid-{}", pl.int_range(pl.len())).alias("people_id"),
        pl.col("identifier").alias("email"))
    kept = previous.slice(n_gone)  # the first n_gone people left
    flip = np.zeros(kept.height, dtype=bool)
    flip[rng.choice(kept.height, n_changed, replace=False)] = True
    which = rng.integers(0, attributes, kept.height)
    kept = kept.with_columns(
        pl.when(pl.lit(flip) & (pl.lit(which) == i)).then(pl.lit('"changed"'))
        .otherwise(pl.col(f)).alias(f) for i, f in enumerate(fields))
    added = pl.DataFrame({
        "n": np.arange(n_new), **{f: rng.integers(0, 1000, n_new) for f in fields},
    }).select(pl.format("new{}@example.com", "n").alias("identifier"),
              *[pl.format('"v{}"', pl.col(f)).alias(f) for f in fields])
    segment = pl.concat([kept, added]).with_columns(
        pl.int_range(1, pl.len() + 1).alias("row_number"), pl.col("identifier").alias("email"))
    return (segment.select("row_number", "identifier", "email", *fields),
            snapshot.select("identifier", "people_id", "email", *fields))
