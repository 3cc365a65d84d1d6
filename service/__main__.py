"""``python -m service`` and the ``adapter-service`` script: ``serve`` (the default) or a client command."""

from service.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
