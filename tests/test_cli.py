"""The ``adapter-service`` CLI against the real app on loopback: in process through ``main(argv)``, and as a real
subprocess."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.cli import PROGRESS_MIN_BYTES, main
from tests.conftest import make_adapter
from tests.live_service import ADMIN_TOKEN, copy_adapter, service_url, zip_as_is

__all__ = ["service_url"]  # the fixture, imported for pytest

WORKTREE = Path(__file__).parents[1]


@pytest.fixture
def cli(service_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """Run a command in process against the live service; returns (exit status, stdout, stderr)."""
    monkeypatch.setenv("SERVICE_URL", service_url)
    monkeypatch.setenv("SERVICE_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.delenv("SERVICE_API_KEY", raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_list_table_and_json(cli) -> None:
    status, out, _ = cli("list")
    assert status == 0
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "TYPE", "TASK", "RANK", "VIRTUAL", "LABELS", "SIZE", "LOADED", "STATE",
                              "REQUESTS"]
    lora_cls = next(row.split() for row in rows if row.startswith("lora-cls "))
    assert lora_cls[:6] == ["lora-cls", "lora", "classification", "4", "-", "negative,positive"]
    status, out, _ = cli("list", "--json")
    assert {"lora-gen", "lora-tok", "prefix-gen"} <= {entry["name"] for entry in json.loads(out)["adapters"]}


def test_show(cli) -> None:
    status, out, _ = cli("show", "prefix-gen")
    assert status == 0
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert (fields["name"], fields["type"], fields["task"], fields["num_virtual_tokens"]) == (
        "prefix-gen", "prefix_tuning", "generation", "6")
    status, out, _ = cli("show", "prefix-gen", "--json")
    assert json.loads(out)["num_virtual_tokens"] == 6


def test_upload_generate_replace_delete(cli, tiny_base: Path, tmp_path: Path) -> None:
    folder = make_adapter(tiny_base, tmp_path / "trained", "lora", "gen", seed=31)
    (folder / "training_args.bin").write_bytes(b"\x80\x04trainer state")
    status, out, err = cli("upload", str(folder), "--name", "cli-lora")
    assert status == 0, err
    assert "left out of the upload" in err and "training_args.bin" in err and "uploaded cli-lora" in err
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert (fields["name"], fields["type"], fields["task"]) == ("cli-lora", "lora", "generation")

    status, first, err = cli("generate", "cli-lora", "Hello there", "--max-new-tokens", "8")
    assert status == 0 and first.strip() and "new tokens" in err

    status, _, err = cli("upload", str(folder), "--name", "cli-lora")
    assert status == 1 and "already exists" in err
    second = make_adapter(tiny_base, tmp_path / "second", "lora", "gen", seed=32)
    status, out, err = cli("upload", str(second), "--name", "cli-lora", "--replace", "--json")
    assert status == 0 and "replaced cli-lora" not in err  # --json: only the entry
    assert json.loads(out)["sha256"] != fields["sha256"]
    _, replaced, _ = cli("generate", "cli-lora", "Hello there", "--max-new-tokens", "8")
    assert replaced != first

    assert cli("delete", "cli-lora") == (0, "deleted cli-lora\n", "")
    status, out, err = cli("show", "cli-lora")
    assert (status, out) == (1, "") and "no adapter named 'cli-lora'" in err


def test_pickle_folder_is_refused_locally_with_the_servers_message(
    cli, service_url: str, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    folder = copy_adapter(tiny_adapters["lora-cls"], tmp_path / "pickled")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    status, out, err = cli("upload", str(folder), "--name", "pickled", "--url", "http://127.0.0.1:9")  # never sent
    assert (status, out) == (1, "")

    raw = httpx.post(f"{service_url}/v1/adapters", data={"name": "pickled"},
                     files={"archive": ("pickled.zip", zip_as_is(folder))},
                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert raw.status_code == 422
    message = raw.json()["message"]
    assert "pickle" in message and message in err


def test_large_upload_shows_a_progress_bar(cli, tiny_base: Path, tmp_path: Path) -> None:
    # Its own embedding matrix (vocab x 64 floats, ~12 MB) makes this adapter large enough for a bar.
    folder = make_adapter(tiny_base, tmp_path / "big", "lora", "gen", modules_to_save=["embed_tokens"], seed=33)
    assert (folder / "adapter_model.safetensors").stat().st_size > PROGRESS_MIN_BYTES
    status, out, err = cli("upload", str(folder), "--name", "big-lora")
    assert status == 0, err
    assert "upload:" in err and "100%" in err  # tqdm's bar, on stderr
    assert "big-lora" in out
    assert cli("delete", "big-lora")[0] == 0


def test_classify_and_classify_tokens(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    status, out, _ = cli("classify", "lora-cls", "a fine day", "a dreadful day")
    assert status == 0
    lines = [line.split("\t") for line in out.splitlines()]
    assert [line[2] for line in lines] == ["a fine day", "a dreadful day"]
    assert all(label in ("negative", "positive") and 0.5 <= float(score) <= 1.0 for label, score, _ in lines)

    monkeypatch.setattr("sys.stdin", io.StringIO("a fine day\n\na dreadful day\n"))
    status, from_stdin, _ = cli("classify", "lora-cls", "-")
    assert (status, from_stdin) == (0, out)

    status, out, _ = cli("classify-tokens", "lora-tok", "John Smith lives in York", "--json")
    assert status == 0
    [entities] = json.loads(out)["results"]
    assert entities and all("John Smith lives in York"[e["start"]:e["end"]] == e["text"] for e in entities)
    status, out, _ = cli("classify-tokens", "lora-tok", "John Smith lives in York", "--aggregation", "none")
    assert status == 0 and out.startswith("John Smith lives in York\n  ")
    assert {line.split("\t")[0].strip() for line in out.splitlines()[1:]} <= {"B-PER", "I-PER"}


def test_generate_stream_prints_the_greedy_text(cli) -> None:
    status, whole, _ = cli("generate", "lora-gen", "Once upon a time", "--max-new-tokens", "12")
    assert status == 0
    status, streamed, err = cli("generate", "lora-gen", "Once upon a time", "--max-new-tokens", "12", "--stream")
    assert status == 0 and streamed == whole and "new tokens" in err

    status, events, _ = cli("generate", "base", "Once upon a time", "--max-new-tokens", "12", "--stream", "--json")
    *tokens, done = [json.loads(line) for line in events.splitlines()]
    assert done["event"] == "done" and done["adapter"] is None
    assert "".join(token["text"] for token in tokens) == done["text"]
    _, base, _ = cli("generate", "base", "Once upon a time", "--max-new-tokens", "12", "--json")
    assert json.loads(base)["text"] == done["text"] != whole.rstrip("\n")


def test_errors_print_the_servers_message_and_exit_non_zero(cli) -> None:
    status, out, err = cli("generate", "nope", "hello")
    assert (status, out) == (1, "") and "no adapter named 'nope'" in err and "404" in err
    status, _, err = cli("classify", "lora-gen", "hello")
    assert status == 1 and "generation adapter" in err
    status, _, err = cli("delete", "lora-gen", "--token", "wrong")
    assert status == 1 and "admin routes need 'Authorization: Bearer <SERVICE_ADMIN_TOKEN>'" in err and "401" in err
    assert cli("show", "lora-gen")[0] == 0  # still there


def test_a_real_subprocess_lists_adapters(service_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(WORKTREE), "SERVICE_URL": ""}
    result = subprocess.run([sys.executable, "-m", "service", "list", "--url", service_url], capture_output=True,
                            text=True, env=env, cwd=WORKTREE, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("NAME") and "\nlora-cls " in result.stdout

    unknown = subprocess.run([sys.executable, "-m", "service", "show", "nope", "--url", service_url],
                             capture_output=True, text=True, env=env, cwd=WORKTREE, timeout=60)
    assert unknown.returncode == 1 and "no adapter named 'nope'" in unknown.stderr


def test_serve_is_still_the_default_command() -> None:
    result = subprocess.run([sys.executable, "-m", "service", "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(WORKTREE)}, cwd=WORKTREE, timeout=120)
    assert result.returncode == 0
    for flag in ("--host", "--port", "--base-model", "--adapters-dir", "--device", "--log-level"):
        assert flag in result.stdout
    assert "upload" in result.stdout  # and it points at the client commands
    serve = subprocess.run([sys.executable, "-m", "service", "serve", "--help"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(WORKTREE)}, cwd=WORKTREE, timeout=120)
    assert serve.returncode == 0 and "--port" in serve.stdout


def test_usage_errors_exit_2(cli) -> None:
    with pytest.raises(SystemExit) as usage:
        cli("generate", "lora-gen")  # no prompt
    assert usage.value.code == 2


def test_options_before_the_command_belong_to_it(cli, service_url: str) -> None:
    status, out, _ = cli("--url", service_url, "--json", "list")
    assert status == 0 and "lora-gen" in {entry["name"] for entry in json.loads(out)["adapters"]}


def test_an_unknown_command_is_named(cli) -> None:
    status, _, err = cli("lst")
    assert status == 2 and "unknown command 'lst'" in err and "list" in err
