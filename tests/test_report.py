"""gradlab report: report.md and index.html, their order and content, and the page in a browser."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import gradlab
from minirun import MINI, run_dir

PNG = b"\x89PNG\r\n\x1a\n"

# one arm, the baseline: each trial trains on its own, as in norm-training
TRAINING_SPEC = """
name = "training-mini"
[settings]
model = "mlp"
dataset = "digits"
batch_size = 16
steps = 3
[arms.trained]
baseline = true
[sweep]
accum_steps = [1, 2]
seed = [0, 1]
"""

# an arm that promises to differ but computes the big-batch gradient: its check fails
BROKEN_PROMISE_SPEC = """
name = "broken-promise"
[settings]
batch_size = 16
steps = 2
accum_steps = 2
[arms.big-batch]
baseline = true
accum_steps = 1
[arms.accumulated]
expect = "differs"
"""


def report(run: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """A copy of the run with its report: (run, report.md, index.html)."""
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    result = gradlab("report", copy)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [str(copy / "report.md"), str(copy / "index.html")]
    return copy, (copy / "report.md").read_text(), (copy / "index.html").read_text()


def spec_run(tmp_path_factory, text: str, exit_code: int = 0) -> Path:
    folder = tmp_path_factory.mktemp("spec")
    (folder / "spec.toml").write_text(text)
    return run_dir(folder / "spec.toml", "--out", folder, exit_code=exit_code)


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    return run_dir("equivalence", *MINI, "--out", tmp_path_factory.mktemp("mini"))


@pytest.fixture(scope="module")
def mini_report(mini, tmp_path_factory) -> tuple[Path, str, str]:
    return report(mini, tmp_path_factory.mktemp("report"))


def headings(md: str) -> list[str]:
    """The Markdown headings, not the comments of the spec's TOML in its code block."""
    return [line for line in md.split("```")[0].splitlines() if line.startswith("#")]


def test_report_opens_with_the_table_and_the_figures_then_details(mini_report):
    run, md, page = mini_report
    assert headings(md) == [
        "# equivalence: gradlab report",
        "## equivalence: each arm's distance from the exact gradient (vs exact) by N",
        "## Figures", "### Training loss of each arm",
        "### Gradient error against N, at the baseline's weights",
        "## Details", "### The arms",
        "### equivalence: each arm against the baseline 'big-batch'",
        "### How to read the table", "### What was run",
        "### The spec (equivalence.toml)"]
    pivot = md.index("| arm | N=1 | N=2 | N=4 |")  # the compact table, as the run printed it
    assert pivot < md.index("![Training loss of each arm](figures/equivalence-loss.png)") \
        < md.index("- `accumulated`: N micro-batches of B/N, each loss scaled by its share") \
        < md.index("| trial | arm | N |") < md.index("| run | ") \
        < md.index("```toml\n# gradlab run equivalence")
    assert "5 expectations hold, 1 n/a, 0 fail" in md[pivot:]
    # the same order in the page
    assert page.index("<th>N=1</th>") < page.index("data:image/png;base64,") \
        < page.index("<h2>Details</h2>") < page.index("<th>rel grad err</th>") \
        < page.index("<pre><code># gradlab run equivalence")


def test_the_page_holds_its_figures_and_the_spec_text(mini_report):
    run, md, page = mini_report
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(PNG) for i in images)
    assert "src='figures" not in page and "http:" not in page and "https:" not in page
    spec_text = json.loads((run / "run.json").read_text())["spec_text"]
    assert 'expect = "differs"' in spec_text and spec_text.strip() in md
    assert "expect = &quot;differs&quot;" in page  # escaped, not parsed as markup


def test_markdown_is_rendered_in_the_page(mini_report):
    _, md, page = mini_report
    assert "(`gradlab compare --check` exits 0)" in md
    assert "(<code>gradlab compare --check</code> exits 0)" in page
    assert "`" not in page.split("<pre>")[0]  # outside the spec's text, no backtick is left


def test_colour_follows_the_check_not_the_verdict(mini_report):
    _, _, page = mini_report
    classes = {c for found in re.findall(r"class='([^']*)'", page) for c in found.split()}
    assert classes <= {"num", "met", "failed", "unchecked", "note"}  # never a cell's text
    rows = re.findall(r"<tr>(.*?)</tr>", page)
    # the compact table: each cell coloured by its own expectation; expected to differ, and
    # it did: green, like every expectation met; at N = 1 not checked: grey
    (pivot_row,) = [r for r in rows if r.startswith("<td>no-loss-scaling</td>")]
    assert "<td class='num met'>3✓</td>" in pivot_row
    assert re.search(r"<td class='num unchecked'>[^<]*·</td>", pivot_row)
    # the full table: the verdict and the check of each row
    differs = [r for r in rows if ">no-loss-scaling<" in r and ">4<" in r]
    assert differs and "<td class='met'>differs</td><td class='met'>ok</td>" in differs[0]
    at_n_1 = [r for r in rows if ">no-loss-scaling<" in r and "<td class='num'>1</td>" in r]
    assert "<td class='unchecked'>n/a</td>" in at_n_1[0]


def test_a_failed_expectation_is_red_and_listed(tmp_path_factory, tmp_path):
    _, md, page = report(spec_run(tmp_path_factory, BROKEN_PROMISE_SPEC, exit_code=1), tmp_path)
    assert "1 expectation(s) of the spec failed" in md
    assert "arm 'accumulated': expected differs, got equivalent" in md
    assert "<td class='failed'>equivalent</td><td class='failed'>FAIL</td>" in page


def test_a_baseline_only_run_shows_what_it_measured_without_verdicts(tmp_path_factory,
                                                                     tmp_path):
    _, md, page = report(spec_run(tmp_path_factory, TRAINING_SPEC), tmp_path)
    assert "## training-mini: what each setting measured (arm 'trained')" in md
    header = next(line for line in md.splitlines() if line.startswith("| N |"))
    assert header == "| N | micro | seeds | n | final loss | test acc |"
    for nothing_to_say in ("verdict", "baseline |", "rel grad err", "tolerance", "here .",
                           "loss diff", "expects"):
        assert nothing_to_say not in md and nothing_to_say not in page
    assert "mean ± std (sample std) over rows that differ only by seed" in md


def test_the_toy_report_shows_its_trace(tmp_path_factory, tmp_path):
    toy = run_dir("toy", "--out", tmp_path_factory.mktemp("toy"))
    _, md, page = report(toy, tmp_path)
    assert "![The accumulated .grad after each backward, and the weights]" \
           "(figures/toy-trace.png)" in md
    for row in ("| 0 | accumulated | 1 | micro-batch 1 | weight[0].grad | -16 |",
                "| 0 | accumulated | 1 | micro-batch 2 | weight[0].grad | -20 |",
                "| 0 | big-batch | 1 | micro-batch 1 | weight[0].grad | -20 |",
                "| 0 | accumulated | 1 | optimizer step | weight[0] | 1.2 |"):
        assert row in md
    assert page.count("data:image/png;base64,") == 1


def test_report_takes_one_run(mini):
    result = gradlab("report", mini.parent)
    assert result.exit_code == 2 and "not a run directory" in result.stderr


# ----------------------------------------------------------------------------- in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe"]


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4: one JSON
    message per NUL-terminated chunk), so no port, no websocket and no extra package."""

    def __init__(self, profile: Path):
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()

        def onto_3_and_4():  # the protocol's fixed descriptors, whatever numbers ours have
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"], pass_fds=(3, 4),
            preexec_fn=onto_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buffer, self._last_id, self.events = b"", 0, []

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self._last_id)
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply.get("result", {})

    def wait(self, match, timeout: float = 60) -> dict:
        """The first message that matches; every event on the way is kept in self.events."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if match(message):
                    return message
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self._read], [], [], left)[0], \
                "chromium did not answer within a minute"
            chunk = os.read(self._read, 1 << 20)
            assert chunk, "chromium closed the pipe"
            self._buffer += chunk

    def close(self) -> None:
        try:
            os.write(self._write, json.dumps({"id": 0, "method": "Browser.close"}).encode()
                     + b"\0")
            self.process.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        os.close(self._write)
        os.close(self._read)


def visit(page: Path, screenshot: Path, profile: Path, width: int = 1400) -> tuple[list, list]:
    """Load a page; save a full-page screenshot. Returns each image's decoded width (0 when it
    did not load) and every console error or warning, failed load and non-local request."""
    browser = Browser(profile)
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        session = browser.send("Target.attachToTarget", targetId=target,
                               flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session)
        browser.send("Emulation.setDeviceMetricsOverride", session, width=width, height=900,
                     deviceScaleFactor=1, mobile=False)
        browser.send("Page.navigate", session, url=page.resolve().as_uri())
        browser.wait(lambda m: m.get("method") == "Page.loadEventFired")
        widths = browser.send("Runtime.evaluate", session, returnByValue=True, expression=(
            "Array.from(document.images, i => i.complete ? i.naturalWidth : 0)"))
        height = browser.send("Page.getLayoutMetrics", session)["cssContentSize"]["height"]
        shot = browser.send("Page.captureScreenshot", session, format="png",
                            captureBeyondViewport=True,
                            clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.close()
    problems = []
    for event in browser.events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning",
                                                                         "assert"):
            problems.append(f"console.{params['type']}: {params['args']}")
        elif method == "Runtime.exceptionThrown":
            problems.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            problems.append(f"{params['entry']['level']}: {params['entry']['text']}")
        elif method == "Network.requestWillBeSent" and not params["request"]["url"].startswith(
                ("file:", "data:")):
            problems.append(f"request: {params['request']['url']}")
    return widths["result"]["value"], problems


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH "
                                    "(Debian: apt-get install chromium)")


@needs_chromium
def test_the_page_loads_in_chromium_with_no_errors_and_no_requests(mini_report, tmp_path):
    run, _, _ = mini_report
    widths, problems = visit(run / "index.html", tmp_path / "report.png", tmp_path / "profile")
    assert problems == []
    assert len(widths) == 2 and all(w > 500 for w in widths)  # both figures decoded
    shot = (tmp_path / "report.png").read_bytes()
    assert shot.startswith(PNG)
    assert int.from_bytes(shot[16:20], "big") == 1400  # the PNG header's width
    assert int.from_bytes(shot[20:24], "big") > 1500  # the whole page: table, figures, spec


@needs_chromium
def test_the_browser_check_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><html><head><meta charset='utf-8'><title>x</title></head>"
                    "<body><img src='https://example.invalid/a.png'><img src='missing.png'>"
                    "<script>console.error('boom')</script></body></html>")
    widths, problems = visit(page, tmp_path / "broken.png", tmp_path / "profile")
    assert widths == [0, 0]
    assert "request: https://example.invalid/a.png" in problems
    assert any(p.startswith("console.error") and "boom" in p for p in problems)
    assert any("Failed to load resource" in p for p in problems)
