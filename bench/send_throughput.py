"""Sending throughput: the same people-data writes, through Crisp's official Python client in
a sequential loop (what a hand-written script does) and through the pipeline's sync engine
(bounded concurrency, pacing), against the emulator serving in its own process with 50 ms of
latency per request.

    python bench/send_throughput.py                    # 50 ms latency, 300 vs 1,500 writes, 16 in flight
    python bench/send_throughput.py --latency-ms 100 --in-flight 24

Each write is a distinct `PATCH people/data/{id}` (distinct values: no batching possible), so
the comparison is of sending alone. Target: at least 10 times the sequential throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys
import time

import httpx

WEBSITE, TOKEN_ID, TOKEN_KEY, ADMIN = "bench", "bench-id", "bench-key", "bench-admin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_emulator(port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "crisp_pipeline.cli", "emulator", "--port", str(port),
         "--website-id", WEBSITE, "--token", f"{TOKEN_ID}:{TOKEN_KEY}", "--rate-limit", "0",
         "--daily-quota", "10000000", "--admin-key", ADMIN],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=0.2)
            return process
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the emulator did not start")


def settings(port: int):
    from crisp_pipeline.crisp import CrispSettings, Secret

    return CrispSettings(website_id=WEBSITE, token_identifier=TOKEN_ID,
                         token_key=Secret(TOKEN_KEY), base_url=f"http://127.0.0.1:{port}/v1/",
                         daily_quota=10_000_000)


async def create_people(port: int, count: int) -> list[str]:
    from crisp_pipeline.crisp import CrispClient

    async with CrispClient(settings(port), max_in_flight=32) as client:
        return list(await asyncio.gather(*(client.create_profile(
            {"email": f"t{i}@bench.io", "person": {"nickname": "T"}}) for i in range(count))))


def set_latency(port: int, latency_ms: float) -> None:
    httpx.put(f"http://127.0.0.1:{port}/_emulator/faults", json={"latency_ms": latency_ms},
              headers={"X-Emulator-Admin": ADMIN}).raise_for_status()


def official_sequential(port: int, people: list[str]) -> float:
    from crisp_api import Crisp

    client = Crisp()
    client.set_rest_host(f"http://127.0.0.1:{port}")
    client.authenticate(TOKEN_ID, TOKEN_KEY)
    client.set_tier("plugin")
    started = time.perf_counter()
    for index, people_id in enumerate(people):
        client.website.update_people_data(WEBSITE, people_id, {"data": {"score": index}})
    return time.perf_counter() - started


async def engine_concurrent(port: int, people: list[str], in_flight: int) -> tuple[float, dict]:
    from crisp_pipeline.crisp import CrispClient
    from crisp_pipeline.sync.engine import SyncEngine

    rows = [{"identifier": f"t{i}@bench.io", "op": "update", "people_id": people_id,
             "new_values": f'{{"data.score":{i + 1}}}', "data_values": f'{{"score":{i + 1}}}'}
            for i, people_id in enumerate(people)]
    async with CrispClient(settings(port), max_in_flight=in_flight) as client:
        engine = SyncEngine(client, ["data.score"])
        started = time.perf_counter()
        summary = await engine.apply(rows, lambda batch: None)
        seconds = time.perf_counter() - started
        assert summary.count("ok") == len(rows), summary.people
        return seconds, client.stats.as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--sequential-writes", type=int, default=300)
    parser.add_argument("--engine-writes", type=int, default=1500)
    parser.add_argument("--in-flight", type=int, default=16)
    args = parser.parse_args()
    port = free_port()
    emulator = start_emulator(port)
    try:
        people = asyncio.run(create_people(port, max(args.sequential_writes,
                                                     args.engine_writes)))
        set_latency(port, args.latency_ms)
        sequential = official_sequential(port, people[:args.sequential_writes])
        concurrent, stats = asyncio.run(engine_concurrent(port, people[:args.engine_writes],
                                                          args.in_flight))
    finally:
        emulator.send_signal(signal.SIGINT)
        emulator.wait(timeout=30)
    base = args.sequential_writes / sequential
    ours = args.engine_writes / concurrent
    print(f"people-data writes against the emulator in its own process, "
          f"{args.latency_ms:.0f} ms latency per request")
    print(f"  official crisp-api client, sequential: {args.sequential_writes:>6} writes in "
          f"{sequential:6.2f} s = {base:7.1f} writes/s")
    print(f"  crisp-pipeline engine, {args.in_flight} in flight:  {args.engine_writes:>6} writes in "
          f"{concurrent:6.2f} s = {ours:7.1f} writes/s  (retries {stats['retries']})")
    print(f"  ratio: {ours / base:.1f}x  (target >= 10x: {'met' if ours / base >= 10 else 'MISSED'})")


if __name__ == "__main__":
    main()
