"""The report as a reader first sees it: in headless Chromium at 1400 x 900, the first screen holds the question,
the legend and the whole verdict matrix with one evidence sentence per cell; figures are embedded compressed."""

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from latentprobe.report.render import FINDING_TITLES, QUESTION, first_sentence, write_report
from latentprobe.verdicts import FINDINGS, Verdict

WORDS = {"input_latent": "connected", "latent_answer": "disconnect", "collapse": "not collapsed",
         "visual_info": "inconclusive"}
# As long as the verdicts' evidence strings get: the demo's run to 700 characters in several sentences. The
# matrix shows the first sentence (at most 180 characters); the finding's section shows all of it.
EVIDENCE = ("0 of 80 answers changed when the latents were patched from another instance; 95% upper bound 0.045 is "
            "below the margin 0.05, and the image-swap NIE on correctness is 0.000 [-0.02, 0.02] (n=80). "
            + "Secondary: image-blank(colour=gray) NDE_answer_changed (all_layers mediator) 0.812 [0.710, 0.891]; " * 6)
SUBJECTS = [f"organism-{name}" for name in ("bottleneck", "shortcut", "mirage", "lvr", "capimagine", "direct")]

SCREEN_CHECK = """<script>
window.addEventListener("load", function () {
  function box(el) { if (!el) return null; var r = el.getBoundingClientRect();
                     return {top: r.top, bottom: r.bottom, left: r.left, right: r.right}; }
  var cells = Array.from(document.querySelectorAll("#verdict-matrix tbody td .evidence"));
  var result = {width: window.innerWidth, height: window.innerHeight,
                page_width: document.documentElement.scrollWidth,
                matrix: box(document.getElementById("verdict-matrix")),
                legend: box(document.querySelector(".legend")), question: box(document.querySelector(".question")),
                headers: Array.from(document.querySelectorAll("#verdict-matrix th")).map(function (t) {
                  return t.textContent; }),
                evidence: cells.map(function (c) { return c.textContent; })};
  var out = document.createElement("pre"); out.id = "screen-check"; out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def chromium():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium not found: apt-get install chromium")
    return browser


def run_chromium(page, tmp_path, *extra):
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
               "--window-size=1400,900", "--virtual-time-budget=10000", *extra, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def six_subject_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("screen")
    judged = [Verdict(subject, finding, WORDS[finding] if subject != "organism-direct" else "not measured",
                      rule="a rule", evidence=EVIDENCE if subject != "organism-direct" else "no latent steps")
              for subject in SUBJECTS for finding in FINDINGS]
    md, page = write_report(out, subjects=[{"name": s} for s in SUBJECTS], judged=judged)
    return md, page


def test_first_screen_holds_the_verdict_matrix(six_subject_report, tmp_path):
    _, page = six_subject_report
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", SCREEN_CHECK + "</body>"))
    result = run_chromium(checked, tmp_path, "--dump-dom")
    match = re.search(r'<pre id="screen-check">(.*?)</pre>', result.stdout)
    assert match, f"no screen check in the DOM; chromium said: {result.stderr[-2000:]}"
    check = json.loads(match.group(1))
    assert check["width"] <= 1400 and check["height"] <= 900, check
    assert check["page_width"] <= check["width"], check  # nothing sticks out sideways (the legend wraps)
    for part in ("question", "legend", "matrix"):
        box = check[part]
        assert box is not None and box["top"] >= 0 and box["bottom"] <= check["height"], (part, check)
        assert box["right"] <= check["width"], (part, check)
    assert check["headers"] == ["subject"] + [FINDING_TITLES[f] for f in FINDINGS]
    assert len(check["evidence"]) == len(SUBJECTS) * len(FINDINGS)
    shown = first_sentence(EVIDENCE)
    assert len(shown) <= 182 and shown.endswith("…") and check["evidence"].count(shown) == 5 * len(FINDINGS)
    html = page.read_text()
    assert QUESTION[:40] in html and html.count(EVIDENCE.strip()) >= 5 * len(FINDINGS)  # whole, in the sections


def test_screenshot_of_the_first_screen(six_subject_report, tmp_path):
    _, page = six_subject_report
    shot = tmp_path / "first-screen.png"
    run_chromium(page, tmp_path, f"--screenshot={shot}")
    assert shot.exists()
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1400, 900)
        pixels = np.asarray(image.convert("RGB"))
    # the verdict colours are on the first screen: the orange of "connected" and the blue of "disconnect"
    for colour in ((0xf8, 0xd9, 0xb5), (0xcf, 0xe3, 0xf5)):
        assert (np.abs(pixels.astype(int) - colour).sum(axis=2) < 6).sum() > 200, colour


def test_markdown_leads_with_the_matrix(six_subject_report):
    md, _ = six_subject_report
    text = md.read_text()
    assert text.index("| subject | Do the latents react to the input?") < text.index("## Finding 1")
    assert text.index("## Appendix") > text.index("## Finding 4")
