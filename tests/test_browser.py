"""The run report and the sweep report opened in a real browser: headless Chromium (Debian's ``chromium`` package)
driven by playwright. Every image loads, every table renders with its rows, no raw Markdown shows, and a full-page
screenshot of each report is saved under the test's tmp dir (and into ``$MEDVQA_SCREENSHOTS`` when set).

Skipped, with the reason, when Chromium or playwright is missing (``apt-get install chromium``; playwright is in
the ``test`` extra; ``playwright install`` is not needed). A report can also be checked and shot by hand:

    python tests/test_browser.py RUN_DIR/report/report.html report.png
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("MEDVQA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS_ENV = "MEDVQA_SCREENSHOTS"
# Headless and quiet on the network: without the background-networking flags Chromium opens connections of its own
# (updates, sync, field trials), which a closed network refuses, many at a time.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 900}

# In the page: every <img> (loaded = complete with a decoded width), every <table> (header cells, body rows, and
# the cell count of each body row), and the visible text outside <pre> (the embedded config.yaml).
_IMAGES_JS = "els => els.map(e => ({src: e.getAttribute('src'), complete: e.complete, width: e.naturalWidth}))"
_TABLES_JS = """els => els.map(t => ({
    header: t.tHead ? t.tHead.rows[0].cells.length : 0,
    rows: t.tBodies.length ? Array.from(t.tBodies[0].rows).map(r => r.cells.length) : []}))"""
_TEXT_JS = """() => { const b = document.body.cloneNode(true); b.querySelectorAll('pre').forEach(p => p.remove());
                     return b.textContent; }"""
#: Markdown that must not reach the page as text
MARKDOWN_LEFTOVERS = ("`", "](", "|---", "| --- |", "\n## ", "![")


def chromium_missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MEDVQA_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


def open_browser(stack):
    """A fresh headless Chromium (its own temporary profile) as a playwright context, closed with ``stack``."""
    from playwright.sync_api import sync_playwright

    pw = stack.enter_context(sync_playwright())
    profile = stack.enter_context(tempfile.TemporaryDirectory(prefix="chromium-profile-"))
    context = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                    viewport=VIEWPORT)
    stack.callback(context.close)
    return context


def inspect_report(browser, html_path: Path, screenshot: Path) -> dict:
    """Open ``html_path`` in a new page, wait until it and its images have loaded, save a full-page screenshot;
    returns {'images', 'tables', 'text', 'errors'} as the browser saw them."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"{r.url}: {r.failure}"))
    page.goto(html_path.resolve().as_uri(), wait_until="load")
    seen = {"images": page.eval_on_selector_all("img", _IMAGES_JS),
            "tables": page.eval_on_selector_all("table", _TABLES_JS),
            "text": page.evaluate(_TEXT_JS), "errors": errors}
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    if os.environ.get(SCREENSHOTS_ENV):
        shutil.copy(screenshot, Path(os.environ[SCREENSHOTS_ENV]) / screenshot.name)
    return seen


def assert_renders(seen: dict, images: set[str], min_tables: int) -> None:
    assert seen["errors"] == []
    assert {i["src"] for i in seen["images"]} == images
    broken = [i["src"] for i in seen["images"] if not (i["complete"] and i["width"] > 0)]
    assert broken == [], f"images that did not load: {broken}"
    assert len(seen["tables"]) >= min_tables
    for t in seen["tables"]:
        assert t["header"] > 0 and t["rows"], f"a table without header or rows: {t}"
        assert set(t["rows"]) == {t["header"]}, f"rows whose cell count differs from the header: {t}"
    leftovers = [m for m in MARKDOWN_LEFTOVERS if m in seen["text"]]
    assert leftovers == [], f"raw Markdown in the page: {leftovers}"


skip_reason = chromium_missing()


@pytest.fixture(scope="module")
def browser():
    if skip_reason:
        pytest.skip(skip_reason)
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield open_browser(stack)


def test_run_report_in_chromium(browser, tmp_path):
    from test_report import make_run

    from medvqa.report import build_report

    out = build_report(make_run(tmp_path))
    seen = inspect_report(browser, Path(out["html"]), tmp_path / "run_report.png")
    plots = {f"plots/{n}.png" for n in ("metrics", "forest", "training_stage1", "training_stage2")}
    # Figure 2, 2 breakdowns, reliance, abstention, paired tests, validation rounds, stage and cell cost
    assert_renders(seen, plots, min_tables=9)
    for words in ("Training curves (Figure 4)", "Cost", "two_stage_vs_base", "tiny-run-abc123"):
        assert words in seen["text"]
    assert (tmp_path / "run_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_report_in_chromium(browser, tmp_path):
    from test_sweep import _fake_sweep

    from medvqa.sweep_report import write_report

    out = write_report(_fake_sweep(tmp_path))
    seen = inspect_report(browser, Path(out["html"]), tmp_path / "sweep_report.png")
    assert_renders(seen, {"curve.png"}, min_tables=4)  # cells, importance, trials, errors
    assert "t5" in seen["text"] and "boom" in seen["text"]  # the best trial of _fake_sweep and the failed one
    assert (tmp_path / "sweep_report.png").stat().st_size > 10_000


if __name__ == "__main__":  # check one report by hand and shoot it
    if skip_reason:
        sys.exit(skip_reason)
    from contextlib import ExitStack

    with ExitStack() as stack:
        result = inspect_report(open_browser(stack), Path(sys.argv[1]), Path(sys.argv[2]))
    broken = [i["src"] for i in result["images"] if not (i["complete"] and i["width"] > 0)]
    print(f"{len(result['images'])} images ({len(broken)} broken: {broken}), {len(result['tables'])} tables, "
          f"errors: {result['errors'] or 'none'}; screenshot: {sys.argv[2]}")
