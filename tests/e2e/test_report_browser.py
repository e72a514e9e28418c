"""report.html as a reader sees it: rendered by headless Chromium, every image decodes and
the page logs no error. CI installs Debian's chromium (.ci/run); without it the test is
skipped with a reason, never passed silently."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from attnscope.cli.app import app

pytestmark = pytest.mark.slow

_CHECK = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60));
  const out = document.createElement('pre');
  out.id = '__attnscope_check';
  out.textContent = JSON.stringify({images: imgs.length, broken: broken, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium on this machine (apt-get install chromium); .ci/run installs it")


def _render(page, tmp_path) -> tuple[dict, list[str]]:
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--dump-dom",
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="__attnscope_check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the page did not finish loading: {proc.stderr[-2000:]}"
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln and "ERROR" in ln.upper()]
    return json.loads(found.group(1)), console


def test_compare_report_renders_with_every_image_and_no_error(tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        ["compare", "test_vit", "test_vit2", "--random-init", "--max-images", "2", "--gallery", "2"]
        + ["--out", str(out)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text(encoding="utf-8")
    page = out / "report-checked.html"  # the report itself stays as written
    page.write_text(html.replace("<head>", "<head>" + _CHECK, 1), encoding="utf-8")
    state, console_errors = _render(page, tmp_path)
    assert state["images"] >= 4  # headline panels, per-head figures, gallery
    assert state["broken"] == [] and state["errors"] == [] and console_errors == []


def test_a_broken_image_is_detected(tmp_path):
    """The check itself can fail: a page with an undecodable image is reported."""
    page = tmp_path / "broken.html"
    page.write_text(
        "<html><head></head><body><img alt='bad' src='data:image/png;base64,AAAA'></body></html>",
        encoding="utf-8",
    )
    page.write_text(page.read_text().replace("<head>", "<head>" + _CHECK, 1), encoding="utf-8")
    state, _ = _render(page, tmp_path)
    assert state["broken"] == ["bad"]
