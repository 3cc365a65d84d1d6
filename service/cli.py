"""The ``adapter-service`` command: ``serve`` (the default, so ``adapter-service --host H --port P`` starts the
service as it always did) and commands that talk to a running service through ``service.client``.

Exit status: 0 on success, 1 when the service (or the local check before an upload) refuses, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from service.client import (
    DEFAULT_URL,
    AdapterEntry,
    GenerateResponse,
    ServiceClient,
    ServiceClientError,
    pack,
)
from service.store.store import RESERVED_NAME

BASE = RESERVED_NAME  # generate's NAME for the base model without an adapter
PROGRESS_MIN_BYTES = 4 * 1024 * 1024  # smaller archives go out in about a second or less: a bar would only flash
CLIENT_COMMANDS = ("upload", "list", "show", "delete", "classify", "classify-tokens", "generate")
CLIENT_OPTIONS = ("--url", "--token", "--api-key", "--timeout", "--json")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0].partition("=")[0] in CLIENT_OPTIONS:  # `--url U list`: the options belong to the command
        command = next((arg for arg in args if arg in CLIENT_COMMANDS), None)
        if command is not None:
            args.remove(command)
            args.insert(0, command)
    if args and args[0] in CLIENT_COMMANDS:
        return run_client_command(args)
    if args and not args[0].startswith("-") and args[0] != "serve":
        print(f"adapter-service: unknown command {args[0]!r}; commands: serve (the default), "
              f"{', '.join(CLIENT_COMMANDS)}", file=sys.stderr)
        return 2
    from service.serve import serve  # torch and the server only when serving

    epilog = f"other commands talk to a running service: {', '.join(CLIENT_COMMANDS)} (adapter-service COMMAND --help)"
    return serve(args[1:] if args[:1] == ["serve"] else args, epilog=epilog)


def run_client_command(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    client = ServiceClient(
        args.url or os.environ.get("SERVICE_URL") or DEFAULT_URL,
        api_key=args.api_key or os.environ.get("SERVICE_API_KEY") or None,
        admin_token=args.token or os.environ.get("SERVICE_ADMIN_TOKEN") or None,
        timeout=args.timeout,
    )
    try:
        args.run(client, args)
    except ServiceClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C during a stream or an upload: stop quietly, as shells expect
        return 130
    finally:
        client.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"the service's address (default: $SERVICE_URL, else {DEFAULT_URL})")
    common.add_argument("--token", help="admin token for upload and delete (default: $SERVICE_ADMIN_TOKEN)")
    common.add_argument("--api-key", help="key for inference and listing when the service has SERVICE_API_KEYS "
                                          "(default: $SERVICE_API_KEY; the admin token is used when unset)")
    common.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for an answer (default 300)")
    common.add_argument("--json", action="store_true", help="print the service's JSON instead of text")

    parser = argparse.ArgumentParser(
        prog="adapter-service",
        description="Talk to a running adapter service. Without a command (or with 'serve') the service starts: "
                    "see 'adapter-service --help'.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[ServiceClient, argparse.Namespace], None],
                summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=summary, description=summary)
        sub.set_defaults(run=run)
        return sub

    upload = command("upload", _upload, "pack an adapter folder (or send a .zip/.tar.gz), check it as the service "
                                        "would, upload it and print its entry")
    upload.add_argument("path", metavar="DIR", help="the folder save_pretrained wrote, or a .zip/.tar.gz of it")
    upload.add_argument("--name", required=True, help="the adapter's name in the service")
    upload.add_argument("--replace", action="store_true", help="publish a new version of an existing adapter")
    upload.add_argument("--without-tokenizer", action="store_true",
                        help="leave tokenizer files of the folder out (the service serves the base's tokenizer)")

    command("list", _list, "list the adapters")
    show = command("show", _show, "show one adapter's entry")
    show.add_argument("name", metavar="NAME")
    delete = command("delete", _delete, "delete an adapter")
    delete.add_argument("name", metavar="NAME")

    classify = command("classify", _classify, "classify texts with a classification adapter")
    classify.add_argument("name", metavar="NAME")
    classify.add_argument("texts", metavar="TEXT", nargs="+",
                          help="texts to classify; '-' reads one per line from stdin")

    tokens = command("classify-tokens", _classify_tokens, "label entities in texts with a token classification adapter")
    tokens.add_argument("name", metavar="NAME")
    tokens.add_argument("texts", metavar="TEXT", nargs="+", help="texts to label; '-' reads one per line from stdin")
    tokens.add_argument("--aggregation", choices=("simple", "none"), default="simple",
                        help="'simple' merges an entity's tokens (default); 'none': one item per token")

    generate = command("generate", _generate, f"generate text; NAME '{BASE}' is the base model without an adapter")
    generate.add_argument("name", metavar="NAME")
    generate.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")
    generate.add_argument("--stream", action="store_true", help="print the text as it is generated")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    generate.add_argument("--seed", type=int, help="makes sampling repeatable")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the base's chat template")
    return parser


# commands


def _upload(client: ServiceClient, args: argparse.Namespace) -> None:
    with pack(args.path, args.name, include_tokenizer=not args.without_tokenizer) as packed:
        if packed.left_out:
            print(f"left out of the upload (the service takes no such files): {', '.join(packed.left_out)}",
                  file=sys.stderr)
        with UploadProgress(packed.size) as progress:
            result = client.upload(packed, args.name, replace=args.replace, progress=progress)
    if args.json:
        _print_json(result.adapter.model_dump())
        return
    print(f"{'uploaded' if result.created else 'replaced'} {result.adapter.name}", file=sys.stderr)
    _print_entry(result.adapter)


def _list(client: ServiceClient, args: argparse.Namespace) -> None:
    adapters = client.list_adapters()
    if args.json:
        _print_json({"adapters": [entry.model_dump() for entry in adapters]})
        return
    header = ("NAME", "TYPE", "TASK", "RANK", "VIRTUAL", "LABELS", "SIZE", "LOADED", "STATE", "REQUESTS")
    rows = [(entry.name, entry.type, entry.task, _dash(entry.rank), _dash(entry.num_virtual_tokens),
             ",".join(entry.labels or []) or "-", _size(entry.size_bytes), "yes" if entry.loaded else "no",
             entry.state, str(entry.requests)) for entry in adapters]
    _print_table(header, rows)


def _show(client: ServiceClient, args: argparse.Namespace) -> None:
    entry = client.get_adapter(args.name)
    if args.json:
        _print_json(entry.model_dump())
    else:
        _print_entry(entry)


def _delete(client: ServiceClient, args: argparse.Namespace) -> None:
    client.delete(args.name)
    if args.json:
        _print_json({"deleted": args.name})
    else:
        print(f"deleted {args.name}")


def _classify(client: ServiceClient, args: argparse.Namespace) -> None:
    texts = _read_texts(args.texts)
    results = client.classify(args.name, texts)
    if args.json:
        _print_json({"adapter": args.name, "results": [result.model_dump() for result in results]})
        return
    for text, result in zip(texts, results):
        print(f"{result.label}\t{result.score:.4f}\t{text}")


def _classify_tokens(client: ServiceClient, args: argparse.Namespace) -> None:
    texts = _read_texts(args.texts)
    results = client.classify_tokens(args.name, texts, args.aggregation)
    if args.json:
        _print_json({"adapter": args.name, "results": [[entity.model_dump() for entity in entities]
                                                       for entities in results]})
        return
    for text, entities in zip(texts, results):
        print(text)
        for entity in entities:
            print(f"  {entity.label}\t{entity.score:.4f}\t{entity.start}-{entity.end}\t{entity.text}")
        if not entities:
            print("  (no entities)")


def _generate(client: ServiceClient, args: argparse.Namespace) -> None:
    adapter = None if args.name == BASE else args.name
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_p=args.top_p, stop=args.stop, seed=args.seed, chat=args.chat)
    if not args.stream:
        generation = client.generate(adapter, prompt, **options)
        if args.json:
            _print_json(generation.model_dump())
        else:
            print(generation.text)
            _print_counts(generation)
        return
    for item in client.generate_stream(adapter, prompt, **options):
        if isinstance(item, GenerateResponse):
            if args.json:
                _print_json({"event": "done", **item.model_dump()})
            else:
                print(flush=True)
                _print_counts(item)
        elif args.json:
            _print_json({"event": "token", "text": item})
        else:
            print(item, end="", flush=True)


# output


class UploadProgress:
    """A tqdm bar on stderr for uploads large enough to take a while; nothing for small ones."""

    def __init__(self, total: int) -> None:
        self._bar = None
        if total >= PROGRESS_MIN_BYTES:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="upload",
                             file=sys.stderr, disable=False)

    def __enter__(self) -> Callable[[int, int], None] | None:
        return self._update if self._bar is not None else None

    def _update(self, sent: int, total: int) -> None:
        self._bar.update(sent - self._bar.n)

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.close()


def _print_entry(entry: AdapterEntry) -> None:
    fields = entry.model_dump()
    fields["labels"] = ", ".join(entry.labels) if entry.labels else None
    fields["target_modules"] = ", ".join(entry.target_modules) if entry.target_modules else None
    fields["size_bytes"] = f"{entry.size_bytes} ({_size(entry.size_bytes)})"
    fields["loaded"] = "yes" if entry.loaded else "no"
    width = max(len(key) for key in fields)
    for key, value in fields.items():
        if value is not None:
            print(f"{key:<{width}}  {value}")


def _print_table(header: Sequence[str], rows: list[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def _print_counts(generation: GenerateResponse) -> None:
    print(f"[{generation.finish_reason}; {generation.generated_tokens} new tokens, "
          f"{generation.prompt_tokens} prompt tokens]", file=sys.stderr)


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False))


def _read_texts(texts: list[str]) -> list[str]:
    if texts == ["-"]:
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    return texts


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _size(size_bytes: int) -> str:
    if size_bytes < 1024:
        return f"{size_bytes} B"
    size, unit = size_bytes / 1024, "KB"
    for larger in ("MB", "GB"):
        if size < 1024:
            break
        size, unit = size / 1024, larger
    return f"{size:.1f} {unit}"
