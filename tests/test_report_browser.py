"""The report as a person sees it: a demo-sized report (tests/report_dataset.py: every section,
paste-back composites, training grids) opened in headless Chromium through Selenium, and the
same page fed hostile text.

Chromium and its driver come from Debian's packages (`.ci/run` installs them; no browser is
downloaded). Without them the browser test is skipped with the command that installs them.
"""
from __future__ import annotations

import base64
import io
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from jobs import report
from jobs.cli import load_config
from pipeline import storage
from tests import report_dataset

APT = "apt-get install -y chromium chromium-driver"
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync")
DATA_URI = re.compile(r'src="(data:image/(png|jpeg);base64,([^"]*))"')
SVG = re.compile(r"<svg .*?</svg>", re.S)
X_TICK = re.compile(r'text-anchor="middle" font-size="10">([^<]*)</text>')
Y_TICK = re.compile(r'text-anchor="end" font-size="10">([^<]*)</text>')


def _report(root: str) -> tuple[str, dict]:
    res = report.run(load_config(report.SETTINGS, None, [f"input={root}"]))
    return storage.read_bytes(res["extra"]["report"]).decode("utf-8"), res


def _decodes(html: str) -> tuple[int, list[str]]:
    """(distinct embedded images, the ones that do not decode as the image type they claim)."""
    found = set(DATA_URI.findall(html))
    bad = []
    for uri, kind, b64 in found:
        try:
            with Image.open(io.BytesIO(base64.b64decode(b64, validate=True))) as im:
                im.load()
                assert im.format.lower() == kind
        except Exception as e:  # noqa: BLE001 - collected, asserted below
            bad.append(f"{uri[:60]}...: {type(e).__name__}: {e}")
    return len(found), bad


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("report") / "ds")
    built = report_dataset.build(root)
    html, res = _report(root)
    return {"root": root, "built": built, "html": html, "uri": res["extra"]["report"], "res": res}


@pytest.fixture
def chromium(tmp_path):
    chrome, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chrome and driver):
        pytest.skip(f"headless Chromium is not installed: {APT} (Debian's packages, as .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,900"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=opts)
    yield d
    d.quit()


IMAGES_JS = """return [...document.images].map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth,
    section: (i.closest('section') || {}).id}))"""
OVERFLOW_JS = """return [...document.querySelectorAll('section')].flatMap(s => {
    const box = s.getBoundingClientRect(), out = [];
    if (s.scrollWidth > s.clientWidth) out.push(s.id + ': scrollWidth ' + s.scrollWidth + ' > ' + s.clientWidth);
    for (const e of s.querySelectorAll('img, svg, .scroll, .cell, .pairrow, pre')) {
        const r = e.getBoundingClientRect();
        if (r.right > box.right + 0.5 || r.left < box.left - 0.5)
            out.push(s.id + ': ' + e.tagName + '.' + (e.getAttribute('class') || '') + ' spans '
                     + r.left + '-' + r.right + ' outside ' + box.left + '-' + box.right);
    }
    return out;
})"""


def test_demo_sized_report_in_chromium(demo_report, chromium, tmp_path):
    """Every image shows, the console is clean, every section is there, nothing overflows at a
    laptop's width or a narrow one, the whole-photo before | after pairs of the edits are
    shown; a screenshot is kept in the test's temp folder."""
    chromium.get(Path(demo_report["uri"]).as_uri())
    images = chromium.execute_script(IMAGES_JS)
    broken = [i for i in images if not (i["complete"] and i["w"] > 0)]
    print(f"images: {len(broken)} broken of {len(images)}")
    assert len(images) >= 60 and not broken, broken
    assert not [e for e in chromium.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    ids = chromium.execute_script("return [...document.querySelectorAll('section')].map(s => s.id)")
    assert ids == list(report_dataset.SECTIONS)
    # paste-back: per edited photo face, the photo before and one composite per edit after
    shown = [i for i in images if i["section"] == "edits"]
    assert sum(i["alt"] == "photo (before)" for i in shown) == demo_report["built"]["faces"]
    assert sum(i["alt"].startswith("after: ") for i in shown) == demo_report["built"]["faces"] * 4
    assert sum(i["alt"] == "composite (after)" for i in images if i["section"] == "latents") == \
        demo_report["built"]["faces"]
    for width in (1280, 760):
        chromium.set_window_size(width, 900)
        assert chromium.execute_script(OVERFLOW_JS) == [], width
    chromium.set_window_size(1280, 900)
    height = chromium.execute_script("return document.documentElement.scrollHeight")
    chromium.set_window_size(1280, min(int(height), 16000))
    shot = tmp_path / "report.png"
    assert chromium.save_screenshot(str(shot)) and shot.stat().st_size > 100_000
    print(f"screenshot: {shot}")


def test_chart_tick_labels_differ(demo_report):
    svgs = SVG.findall(demo_report["html"])
    assert len(svgs) >= 8
    for svg in svgs:
        for labels in (X_TICK.findall(svg), Y_TICK.findall(svg)):
            assert len(set(labels)) == len(labels), labels


def test_every_embedded_image_decodes(demo_report):
    n, bad = _decodes(demo_report["html"])
    assert n == demo_report["res"]["extra"]["images"] >= 60 and not bad, bad
    assert demo_report["res"]["extra"]["missing_images"] == 0


def test_script_tags_and_presigned_urls_never_reach_the_page(tmp_path):
    """`<script>` and a presigned URL appended to every text field of every table (image URIs
    carry a signed query in their real file names): the page shows the text escaped and the
    queries redacted, holds no script, and every image still decodes."""
    root = str(tmp_path / "ds")
    report_dataset.build(root, poison=report_dataset.POISON)
    html, res = _report(root)
    assert "<script" not in html.lower()
    for secret in report_dataset.SECRETS:
        assert secret not in html, secret
    shown = "&lt;script&gt;alert(1)&lt;/script&gt; https://b.s3.amazonaws.com/k?X-Amz-Signature=REDACTED"
    sections = dict(re.findall(r'<section id="(\w+)">(.*?)</section>', html, re.S))
    for name in ("faces", "latents", "metrics", "edits", "training"):
        assert shown in sections[name], name   # the poisoned text was shown, escaped and redacted
    assert "SIGSECRET0" not in html and "?X-Amz-Signature=REDACTED&amp;X-Amz-Credential=REDACTED" in html
    n, bad = _decodes(html)
    assert n == res["extra"]["images"] >= 60 and not bad, bad
    assert res["extra"]["missing_images"] == 0
