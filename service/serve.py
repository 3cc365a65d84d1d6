"""``adapter-service [serve] --host H --port P`` (``python -m service ...``): start the service; other settings come
from SERVICE_* variables. The default command of the CLI (service.cli)."""

from __future__ import annotations

import argparse
import logging
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.api.app import create_app
from service.settings import Settings


def serve(argv: list[str] | None = None, epilog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__, epilog=epilog)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--base-model", help="overrides SERVICE_BASE_MODEL")
    parser.add_argument("--adapters-dir", help="overrides SERVICE_ADAPTERS_DIR")
    parser.add_argument("--device", help="overrides SERVICE_DEVICE")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    overrides = {
        key: value
        for key, value in {
            "base_model": args.base_model, "adapters_dir": args.adapters_dir, "device": args.device,
        }.items()
        if value is not None
    }
    settings = Settings(**overrides)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    DrainingServer(config, app, settings.shutdown_timeout_s).run()
    return 0


class DrainingServer(uvicorn.Server):
    """On SIGTERM: /ready and new requests answer 503 at once, queued and running work finishes (up to the
    shutdown timeout), then uvicorn stops accepting and shuts down. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_s = drain_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = getattr(self._app.state, "service", None)
        if self._draining or state is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        state.phase, state.message = "stopping", "draining before shutdown"
        state.metrics.ready.set(0)
        threading.Thread(target=self._drain_then_exit, args=(state, sig, frame), daemon=True).start()

    def _drain_then_exit(self, state, sig: int, frame: FrameType | None) -> None:
        deadline = time.monotonic() + self._drain_s
        while time.monotonic() < deadline and state.inference is not None and state.inference.batcher.busy:
            time.sleep(0.05)
        super().handle_exit(sig, frame)
