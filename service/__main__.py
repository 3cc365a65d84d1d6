"""``python -m service --host H --port P``: start the service; other settings come from SERVICE_* variables."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from service.api.app import create_app
from service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
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
    # On SIGTERM uvicorn stops accepting, lets running requests finish, then runs the lifespan shutdown.
    uvicorn.run(
        create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )


if __name__ == "__main__":
    main()
