"""The report in a real headless browser: every image loads, no element box overlaps its
neighbour, no console error. Skipped where no Chromium is installed (Debian: ``apt-get install
chromium``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from test_report import build_store

from distcur.stages.report import build_report

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on PATH (apt-get install chromium)")

# Runs in the page: errors are collected from the start, the checks after load; the result goes
# into the DOM, which --dump-dom prints.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(e.message || ("failed to load " + (e.target.src || "").slice(0, 40))), true);
for (const level of ["error", "warn"]) {
  const orig = console[level];
  console[level] = (...a) => { window.__errors.push(level + ": " + a.join(" ")); orig.apply(console, a); };
}
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({alt: i.alt, loaded: i.complete && i.naturalWidth > 0,
                                                  width: i.getBoundingClientRect().width}));
  const overlaps = [];
  const width = document.documentElement.clientWidth;
  for (const parent of [document.body, ...document.querySelectorAll("figure")]) {
    const kids = [...parent.children].filter(k => k.id !== "probe" && k.tagName !== "SCRIPT");
    for (let i = 0; i < kids.length; i++) {
      const r = kids[i].getBoundingClientRect();
      if (r.right > width + 1) overlaps.push(kids[i].tagName + " runs past the page's right edge");
      if (i + 1 < kids.length) {
        const n = kids[i + 1].getBoundingClientRect();
        if (n.height > 0 && r.height > 0 && n.top < r.bottom - 0.5)
          overlaps.push(kids[i].tagName + " overlaps the next " + kids[i + 1].tagName);
      }
    }
  }
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images, overlaps, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


def _chromium(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", *args], capture_output=True, text=True, timeout=timeout)


def test_report_renders_cleanly_in_chromium(tmp_path):
    page = build_report(build_store(tmp_path / "store"))
    path = tmp_path / "report.html"
    path.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    run = _chromium(f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900",
                    "--virtual-time-budget=10000", "--dump-dom", path.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S)
    assert found, f"no probe result from {BROWSER}: rc {run.returncode}, stderr {run.stderr[-2000:]}"
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                        .replace("&gt;", ">"))
    assert len(result["images"]) >= 8
    assert all(i["loaded"] and i["width"] > 100 for i in result["images"]), result["images"]
    assert result["overlaps"] == []
    assert result["errors"] == []
