"""Screenshots of the web console for the README: the service on the embedded model with the demo adapters of
``adapters_store/``, driven in headless Chromium.

    .venv/bin/python scripts/console_screenshots.py            # writes docs/console-*.png

Writes ``console-generation.png`` (pirate-lora next to the base), ``console-classification.png`` (sentiment-lora's
label bars) and ``console-adapters.png`` (the list, with the requests those runs added).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
VIEWPORT = {"width": 1200, "height": 800}
PROMPT = "What is the tallest mountain on Earth?"
REVIEW = "I loved this movie, it was wonderful."
MAX_PNG_BYTES = 200 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(port: int, admin_token: str) -> subprocess.Popen:
    environment = {**os.environ, "SERVICE_ADMIN_TOKEN": admin_token}
    return subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=environment, start_new_session=True)


def wait_ready(process: subprocess.Popen, url: str, seconds: float = 300.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with code {process.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the service was not ready within {seconds:.0f} s")


def stop_service(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_generation(page: Page) -> None:
    page.get_by_label("Adapter", exact=True).select_option("pirate-lora")
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_label("Max new tokens").fill("48")
    page.get_by_label("Chat template").check()
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("#adapter-output-meta")).to_contain_text("tokens", timeout=120_000)
    expect(page.locator("#base-output-meta")).to_contain_text("tokens", timeout=120_000)


def run_classification(page: Page) -> None:
    page.get_by_label("Adapter", exact=True).select_option("sentiment-lora")
    page.get_by_label("Text", exact=True).fill(REVIEW)
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("#top-label")).to_contain_text("Top label", timeout=60_000)


def take_screenshots(url: str, admin_token: str, out: Path, chromium: str) -> list[Path]:
    shots: list[Path] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url)
        expect(page.get_by_role("rowheader", name="pirate-lora", exact=True)).to_be_visible(timeout=60_000)
        page.get_by_label("Admin token").fill(admin_token)

        run_generation(page)
        page.locator("#playground").scroll_into_view_if_needed()
        shots.append(out / "console-generation.png")
        page.locator("#playground").screenshot(path=shots[-1])

        run_classification(page)
        shots.append(out / "console-classification.png")
        page.locator("#playground").screenshot(path=shots[-1])

        page.evaluate("window.scrollTo(0, 0)")
        shots.append(out / "console-adapters.png")
        page.screenshot(path=shots[-1])
        browser.close()
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNG files")
    parser.add_argument("--port", type=int, default=0, help="the service's port (default: a free one)")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("no 'chromium' binary on PATH (Debian: apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    admin_token = secrets.token_urlsafe(16)
    process = start_service(port, admin_token)
    try:
        wait_ready(process, url)
        shots = take_screenshots(url, admin_token, args.out, chromium)
    finally:
        stop_service(process)
    for shot in shots:
        size = shot.stat().st_size
        note = "" if size <= MAX_PNG_BYTES else f"  (over {MAX_PNG_BYTES // 1024} KB: too large for the README)"
        print(f"{shot.relative_to(ROOT) if shot.is_relative_to(ROOT) else shot}: {size // 1024} KB{note}")


if __name__ == "__main__":
    main()
