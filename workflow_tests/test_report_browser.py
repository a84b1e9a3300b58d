"""report.html of the tiny workflow run in a real browser: headless Chromium at a 1280 px wide window
shows it without horizontal scrolling and with its pivot table; a full-page screenshot is kept."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest


WIDTH = 1280
# Runs once the page and its (inline) images have loaded, and leaves what it measured in the DOM,
# which --dump-dom prints: the widths, the pivot tables and whatever reaches past the window.
PROBE = """<script>addEventListener('load', () => {
  const past = [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > innerWidth);
  const probe = document.createElement('pre');
  probe.id = 'probe';
  probe.textContent = JSON.stringify({scrollWidth: document.documentElement.scrollWidth, innerWidth,
    height: document.documentElement.scrollHeight,
    pivots: [...document.querySelectorAll('table.pivot')].map(t => t.id),
    past: past.slice(0, 10).map(e => e.tagName.toLowerCase() + '.' + e.className)});
  document.body.appendChild(probe);
});</script>"""


def headless(browser: str, profile: Path, height: int, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: Chromium's sandbox refuses to run as root (CI containers); a profile of its own
    # keeps parallel runs apart.
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", f"--window-size={WIDTH},{height}",
                           "--virtual-time-budget=10000", *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> tuple[str, Path]:
    """Chromium and a profile folder; the tests skip, saying why, when it cannot be found or started."""
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if found is None:
        pytest.skip("Chromium not found (Debian package chromium; .ci/run installs it as root)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    try:
        proc = headless(found, profile, 600, "--dump-dom", "about:blank")
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"Chromium ({found}) could not be started: {exc}")
    if proc.returncode != 0 or "<html" not in proc.stdout:
        pytest.skip(f"Chromium ({found}) could not be started (exit {proc.returncode}): {proc.stderr[-500:]}")
    return found, profile


@pytest.fixture(scope="module")
def report_html(tiny_run) -> Path:
    return tiny_run / "results" / "report.html"


def measure(browser: tuple[str, Path], page: Path, folder: Path) -> dict:
    probed = folder / "probe.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    proc = headless(*browser, 1000, "--dump-dom", probed.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no measurement in Chromium's DOM (exit {proc.returncode}): {proc.stderr[-1000:]}"
    return json.loads(found.group(1))


def test_report_fits_a_1280_px_window_and_opens_with_the_pivot(browser, report_html, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report-browser")
    seen = measure(browser, report_html, folder)
    assert seen["innerWidth"] == WIDTH
    assert seen["scrollWidth"] <= seen["innerWidth"], f"wider than the window: {seen['past']}"
    assert seen["past"] == []
    assert seen["pivots"] == ["pivot-1"]  # the tiny run: one test set
    # A screenshot of the whole page (the window as tall as the page), to look at.
    shot = folder / "report.png"
    proc = headless(*browser, min(seen["height"], 16000), f"--screenshot={shot}", report_html.as_uri())
    assert proc.returncode == 0 and shot.stat().st_size > 10_000, proc.stderr[-1000:]
    assert shot.read_bytes()[16:24] == WIDTH.to_bytes(4, "big") + min(seen["height"], 16000).to_bytes(4, "big")
    print(f"screenshot: {shot}")


def test_the_old_one_row_per_bar_layout_would_be_caught(browser, tmp_path):
    """The check itself: a page with a figure wider than the window fails it."""
    page = tmp_path / "wide.html"
    page.write_text("<html><body><div style='width:2400px;height:10px'></div></body></html>")
    seen = measure(browser, page, tmp_path)
    assert seen["scrollWidth"] > WIDTH and seen["past"] == ["div."]
