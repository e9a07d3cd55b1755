"""Serving the emulator over real sockets with uvicorn: in the foreground (the CLI) or in a
background thread (tests, the demo), on a given port or a free one picked by the OS.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from .app import Emulator, EmulatorConfig


class _QuietDrops(logging.Filter):
    """Dropped connections are injected on purpose; uvicorn need not shout about them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


def _uvicorn_config(emulator: Emulator, log_level: str) -> uvicorn.Config:
    logging.getLogger("uvicorn.error").addFilter(_QuietDrops())
    return uvicorn.Config(emulator.app, log_level=log_level, access_log=False,
                          lifespan="on", timeout_keep_alive=30, http="h11")


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


@dataclass
class RunningEmulator:
    """An emulator serving in a background thread; `base_url` is what CRISP_API_URL takes."""

    emulator: Emulator
    host: str
    port: int
    _server: uvicorn.Server
    _thread: threading.Thread

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1/"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> RunningEmulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_in_thread(config: EmulatorConfig, host: str = "127.0.0.1", port: int = 0,
                    log_level: str = "warning") -> RunningEmulator:
    """Start serving and return once the socket accepts connections."""
    emulator = Emulator(config)
    sock = _bind(host, port)
    server = uvicorn.Server(_uvicorn_config(emulator, log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="crisp-emulator", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the Crisp emulator did not start")
        time.sleep(0.01)
    return RunningEmulator(emulator, host, sock.getsockname()[1], server, thread)


def serve_forever(config: EmulatorConfig, host: str, port: int, log_level: str = "info") -> None:
    """Serve in the foreground until SIGINT/SIGTERM, saving state on the way out."""
    emulator = Emulator(config)
    try:
        uvicorn.Server(_uvicorn_config(emulator, log_level)).run(sockets=[_bind(host, port)])
    except KeyboardInterrupt:  # uvicorn re-raises the signal it handled; the stop was clean
        pass
