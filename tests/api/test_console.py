"""The web console at ``/`` in headless Chromium, against the real service on loopback (tiny base, tiny store)."""

from __future__ import annotations

import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.api.app import create_app
from service.store.archive import make_zip
from tests.api.conftest import tiny_settings
from tests.conftest import make_adapter
from tests.servers import serve

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no 'chromium' binary on PATH: the console's browser tests need one "
                             "(Debian: apt-get install chromium; scripts/install.sh --dev installs it)")

if CHROMIUM is not None:
    from playwright.sync_api import Browser, Page, expect, sync_playwright

ADMIN_TOKEN = "test-admin-token"
TIMEOUT_MS = 20_000

# Records the length of the streamed text at every change, to see it grow rather than appear at once.
WATCH_GROWTH = """(id) => {
  const pane = document.getElementById(id);
  const seen = [];
  window.__growth = window.__growth || {};
  window.__growth[id] = seen;
  new MutationObserver(() => seen.push(pane.textContent.length))
    .observe(pane, {characterData: true, childList: true, subtree: true});
}"""


@pytest.fixture(scope="module")
def console_store(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path) -> Path:
    target = tmp_path_factory.mktemp("console") / "store"
    shutil.copytree(tiny_store, target)
    return target


@pytest.fixture(scope="module")
def server(tiny_base: Path, console_store: Path) -> Iterator[str]:
    with serve(create_app(tiny_settings(console_store, base_model=str(tiny_base)))) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


def open_console(browser: Browser, url: str) -> Iterator[Page]:
    """A fresh tab (its own sessionStorage) on the console; fails the test on a script error or a CSP refusal."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on("console", lambda message: problems.append(message.text)
            if "Content Security Policy" in message.text else None)
    response = page.goto(url)
    assert response is not None and response.ok
    assert "default-src 'none'" in response.headers["content-security-policy"]
    yield page
    context.close()
    assert not problems, problems


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    yield from open_console(browser, server)


def listed(server: str, headers: dict[str, str] | None = None) -> dict[str, dict]:
    entries = httpx.get(f"{server}/v1/adapters", headers=headers).json()["adapters"]
    return {entry["name"]: entry for entry in entries}


def row(page: Page, name: str):
    return page.locator("#adapters-body tr").filter(has=page.get_by_role("rowheader", name=name, exact=True))


def choose(page: Page, adapter: str) -> None:
    page.get_by_label("Adapter", exact=True).select_option(adapter)


def test_the_list_shows_the_store_adapters(page: Page, server: str, tiny_adapters: dict[str, Path]) -> None:
    expected = listed(server)
    assert set(expected) == set(tiny_adapters)
    expect(page.locator("#adapters-body tr")).to_have_count(len(expected))
    shown = page.get_by_role("rowheader").all_text_contents()
    assert sorted(shown) == sorted(expected)
    cells = row(page, "lora-cls").get_by_role("cell").all_text_contents()
    entry = expected["lora-cls"]
    assert cells[:4] == ["lora", "Classification", "r = 4", "negative, positive"]
    assert cells[5] == entry["version"] and cells[7] == "ready" and cells[8] == str(entry["requests"])
    assert row(page, "prefix-gen").get_by_role("cell").nth(2).text_content() == "6 virtual tokens"
    # The playground offers the base and every adapter, by task.
    options = page.get_by_label("Adapter", exact=True).locator("option").all_text_contents()
    assert options[0] == "Base model (no adapter)" and sorted(options[1:]) == sorted(expected)


def test_a_generation_streams_next_to_the_base(page: Page, server: str) -> None:
    # Long enough that the stream is seen growing: the tiny model makes 40 tokens faster than a browser paints.
    request = {"prompt": "Hello there, how are you", "max_new_tokens": 200, "temperature": 0.0, "chat": False}
    # The references first: they also warm the model, so the page's streams come token by token.
    adapter_text = httpx.post(f"{server}/v1/generate", json={**request, "adapter": "lora-gen"}, timeout=60).json()
    base_text = httpx.post(f"{server}/v1/generate", json={**request, "adapter": None}, timeout=60).json()
    assert adapter_text["text"] != base_text["text"]
    served_before = listed(server)["lora-gen"]["requests"]

    choose(page, "lora-gen")
    page.get_by_label("Prompt", exact=True).fill(request["prompt"])
    page.get_by_label("Max new tokens").fill(str(request["max_new_tokens"]))
    page.get_by_label("Chat template").uncheck()
    for pane in ("adapter-output", "base-output"):
        page.evaluate(WATCH_GROWTH, pane)
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("#adapter-output-meta")).to_contain_text(f"{adapter_text['generated_tokens']} tokens")
    expect(page.locator("#base-output-meta")).to_contain_text(f"{base_text['generated_tokens']} tokens")

    assert page.locator("#adapter-output").text_content() == adapter_text["text"]
    assert page.locator("#base-output").text_content() == base_text["text"]
    for pane, final in (("adapter-output", adapter_text["text"]), ("base-output", base_text["text"])):
        growth = [length for length in page.evaluate(f"window.__growth[{pane!r}]") if length]
        assert growth == sorted(growth) and growth[-1] == len(final), growth
        assert len(set(growth)) >= 3, f"{pane} did not grow token by token: {growth}"
    # The page refreshed the listing after the run: one more request served by the adapter, none by the base.
    expect(row(page, "lora-gen").locator("td.requests")).to_have_text(str(served_before + 1))


def test_a_classification_shows_its_label_bars(page: Page, server: str) -> None:
    text = "What a lovely afternoon"
    [result] = httpx.post(f"{server}/v1/classify", json={"adapter": "lora-cls", "inputs": text}).json()["results"]
    served_before = listed(server)["lora-cls"]["requests"]
    choose(page, "lora-cls")
    expect(page.get_by_label("Prompt", exact=True)).to_be_hidden()
    page.get_by_label("Text", exact=True).fill(text)
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("#top-label")).to_have_text(f"Top label: {result['label']} ({result['score']:.3f})")
    expect(page.locator("#label-bars li")).to_have_count(2)
    assert page.locator("#label-bars .bar-label").all_text_contents() == list(result["scores"])
    assert page.locator("#label-bars li.top .bar-label").text_content() == result["label"]
    for label, score in result["scores"].items():
        meter = page.get_by_role("meter", name=label)
        assert abs(float(meter.get_attribute("aria-valuenow")) - score) < 1e-6
    expect(row(page, "lora-cls").locator("td.requests")).to_have_text(str(served_before + 1))


def test_token_classification_highlights_entity_spans(page: Page, server: str) -> None:
    text = "John Smith met Mary Jones in Paris and they talked about the weather for hours"
    [entities] = httpx.post(f"{server}/v1/classify_tokens", json={"adapter": "lora-tok", "inputs": text}
                            ).json()["results"]
    assert entities, "the tiny token classifier found no entity in this text; pick another text"
    choose(page, "lora-tok")
    page.get_by_label("Text", exact=True).fill(text)
    page.get_by_role("button", name="Run", exact=True).click()
    marks = page.locator("#entity-text mark")
    expect(marks).to_have_count(len(entities))
    assert marks.all_text_contents() == [entity["text"] for entity in entities]
    assert [marks.nth(i).get_attribute("data-label") for i in range(len(entities))] == [e["label"] for e in entities]
    assert page.locator("#entity-text").text_content() == text  # the marks sit in the text, nothing lost or added


def test_a_server_error_in_the_playground_shows_its_message(page: Page) -> None:
    choose(page, "lora-gen")
    page.get_by_label("Max new tokens").fill("100000")
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("max_new_tokens 100000 exceeds the limit")


def test_an_upload_by_file_input_adds_the_adapter(page: Page, server: str, tiny_base: Path,
                                                  tmp_path: Path) -> None:
    folder = make_adapter(tiny_base, tmp_path / "adapter", "lora", "gen", seed=21)
    archive = tmp_path / "my-upload.zip"
    archive.write_bytes(make_zip({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}))
    page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    page.get_by_label("Archive").set_input_files(archive)
    expect(page.get_by_label("Name", exact=True)).to_have_value("my-upload")  # proposed from the file name
    page.get_by_label("Name", exact=True).fill("console-upload")
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(page.get_by_role("rowheader", name="console-upload", exact=True)).to_be_visible()
    expect(page.locator("#upload-done")).to_contain_text("Uploaded console-upload")
    assert page.locator("#upload-progress").evaluate("bar => bar.value") == 1
    assert listed(server)["console-upload"]["task"] == "generation"
    assert "console-upload" in page.get_by_label("Adapter", exact=True).locator("option").all_text_contents()
    assert page.evaluate("Object.values(sessionStorage)") == [ADMIN_TOKEN]  # the token stays in this tab


def test_a_refused_upload_shows_the_server_message(page: Page, server: str, tmp_path: Path) -> None:
    archive = tmp_path / "pickled.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("adapter_config.json", '{"peft_type": "LORA", "task_type": "CAUSAL_LM"}')
        bundle.writestr("adapter_model.bin", b"not really a pickle")
    page.get_by_label("Archive").set_input_files(archive)
    page.get_by_label("Name", exact=True).fill("pickled")
    page.get_by_role("button", name="Upload", exact=True).click()  # no admin token yet
    expect(page.get_by_role("alert")).to_contain_text("admin routes need 'Authorization: Bearer")
    page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("adapter_model.bin' is a pickle file")
    assert "pickled" not in listed(server)


def test_delete_asks_then_removes_the_row(page: Page, server: str) -> None:
    page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    delete = page.get_by_role("button", name="Delete ia3-attn-gen", exact=True)
    page.once("dialog", lambda dialog: dialog.dismiss())
    delete.click()
    expect(page.get_by_role("rowheader", name="ia3-attn-gen", exact=True)).to_be_visible()
    assert "ia3-attn-gen" in listed(server)
    page.once("dialog", lambda dialog: dialog.accept())
    delete.click()
    expect(page.get_by_role("rowheader", name="ia3-attn-gen", exact=True)).to_have_count(0)
    assert "ia3-attn-gen" not in listed(server)
    assert httpx.get(f"{server}/v1/adapters/ia3-attn-gen").status_code == 404


def test_with_api_keys_the_console_asks_for_one(browser: Browser, tiny_base: Path, console_store: Path) -> None:
    settings = tiny_settings(console_store, base_model=str(tiny_base), api_keys=["console-key"])
    with serve(create_app(settings)) as url:
        for page in open_console(browser, url):
            expect(page.get_by_role("alert")).to_contain_text("Authorization: Bearer <API key>")
            key = page.get_by_label("API key")
            expect(key).to_be_visible()
            key.fill("console-key")
            key.press("Enter")
            key.blur()
            expect(page.get_by_role("rowheader", name="lora-cls", exact=True)).to_be_visible()
            expect(page.get_by_role("alert")).to_have_count(0)
            choose(page, "lora-cls")
            page.get_by_role("button", name="Run", exact=True).click()
            expect(page.locator("#top-label")).to_contain_text(re.compile("Top label: (negative|positive)"))


def test_labels_with_markup_stay_text(page: Page, server: str, tiny_base: Path, tmp_path: Path) -> None:
    # labels.json is the uploader's free text, as is whatever a model generates: it must never become HTML.
    labels = ["<img src=x onerror=window.pwned=1>", "<b>bold</b>"]
    folder = make_adapter(tiny_base, tmp_path / "adapter", "lora", "cls", labels=labels, seed=22)
    archive = make_zip({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
    uploaded = httpx.post(f"{server}/v1/adapters", data={"name": "markup-labels"}, timeout=60,
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, files={"archive": ("a.zip", archive)})
    assert uploaded.status_code == 201, uploaded.text
    page.get_by_role("button", name="Refresh").click()
    cells = row(page, "markup-labels").get_by_role("cell")
    expect(cells.nth(3)).to_have_text(", ".join(labels))
    choose(page, "markup-labels")
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("#label-bars .bar-label")).to_have_text(labels)
    assert page.locator("main img, main b").count() == 0
    assert page.evaluate("window.pwned") is None
