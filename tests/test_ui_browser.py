"""`cascade ui` driven as a user would, in headless Chromium: upload the toy subject (and a
20000x20000 PNG, refused by name), name a secret file as the preset (named, never quoted), identifier
`-sks`; queue stage I and II, cancel and resume (they act on the running, then the stopped job);
train stage I for a few steps, watch it finish (validation grid, loss plot), sample "a [V] toy" through the chain,
move the noise slider (with a `<script>` prompt, which must stay text), run a small SR study, open
the run in the Runs tab; a screenshot of each tab is saved. (What the server serves and accepts,
over plain HTTP: tests/test_ui_server.py.)

Screenshots go to a temporary folder (printed); `CASCADE_UI_SCREENSHOTS=docs/img` also writes the
small PNGs the docs embed (docs/img/ui-*.png)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.ui_server import server  # noqa: F401 (the module's server fixture)
from tests.helpers.ui_server import get, png_header, start, stop

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gradio") is None,
                                reason="gradio is not installed (pip install -e '.[ui]' or '.[dev]')")


def _browser() -> tuple[str, str] | None:
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    return (exe, driver) if exe and driver else None


def test_a_login_guards_pages_api_and_files(tmp_path):
    """With CASCADE_UI_AUTH set, nothing but the login answers until one logs in."""
    import http.cookiejar
    import urllib.parse

    proc, url, log = start(tmp_path, CASCADE_UI_AUTH="ann:s3cret")
    try:
        (tmp_path / "runs" / "note.json").write_text("{}")
        for path in ("/config", "/gradio_api/info", f"/gradio_api/file={tmp_path / 'runs' / 'note.json'}"):
            assert get(url + path) == 401, path
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        bad = urllib.parse.urlencode({"username": "ann", "password": "wrong"}).encode()
        with pytest.raises(urllib.error.HTTPError):
            opener.open(url + "/login", bad, timeout=10)
        good = urllib.parse.urlencode({"username": "ann", "password": "s3cret"}).encode()
        assert opener.open(url + "/login", good, timeout=10).status == 200
        assert opener.open(url + "/config", timeout=10).status == 200
        assert "login required (user ann)" in (tmp_path / "ui.log").read_text()
    finally:
        stop(proc, log)


class Page:
    """Small helpers over selenium for Gradio's components (found by elem_id)."""

    def __init__(self, driver, shots: Path):
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.shots, self.Wait = driver, shots, WebDriverWait

    def css(self, sel: str):
        from selenium.webdriver.common.by import By

        return self.d.find_elements(By.CSS_SELECTOR, sel)

    def wait(self, cond, timeout: float = 60, what: str = ""):
        end = time.time() + timeout
        while time.time() < end:
            try:
                if v := cond():
                    return v
            except Exception:  # a component re-rendered between find and read
                pass
            time.sleep(0.3)
        self.shot("failure")
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    def tab(self, name: str):
        self.wait(lambda: [b for b in self.css("button[role=tab]") if b.text.strip() == name], 30, f"tab {name}")[0].click()
        time.sleep(0.5)

    def field(self, elem_id: str):
        return self.wait(lambda: self.css(f"#{elem_id} textarea, #{elem_id} input")[0], 30, elem_id)

    def type(self, elem_id: str, text: str):
        """Replace the field's text with keystrokes (so the page sees every edit, clearing included)."""
        from selenium.webdriver.common.keys import Keys

        el = self.field(elem_id)
        el.send_keys(Keys.CONTROL, "a")
        el.send_keys(Keys.DELETE)
        if text:
            el.send_keys(text)

    def value(self, elem_id: str) -> str:
        return self.field(elem_id).get_attribute("value") or ""

    def click(self, elem_id: str):
        self.wait(lambda: self.css(f"#{elem_id}"), 30, elem_id)[0].click()

    def choose(self, elem_id: str, option: str):
        """Pick an option of a Gradio dropdown by typing it and taking the match."""
        el = self.field(elem_id)
        el.click()
        self.type(elem_id, option)
        self.wait(lambda: [li for li in self.css(f"#{elem_id} li[role=option]") if option in li.text], 20,
                  f"option {option}")[0].click()
        time.sleep(0.3)

    def images(self, elem_id: str) -> int:
        return len([i for i in self.css(f"#{elem_id} img") if i.get_attribute("src")])

    def shot(self, name: str) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        self.d.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.3)
        path = self.shots / f"ui-{name}.png"
        self.d.save_screenshot(str(path))
        return path


FULL = bool(os.environ.get("CASCADE_UI_FULL") or os.environ.get("CASCADE_UI_SCREENSHOTS"))


def _write_study(folder: Path):
    """A study folder in `cascade study-sr`'s file layout (results.csv, table.md, grid-*.png, plot-*.png),
    with a caption that must stay text."""
    from PIL import Image

    folder.mkdir(parents=True)
    (folder / "results.csv").write_text("model,noise_level,psnr,stripes\nbase,0,17.0,0.33\nlow,0,17.1,0.87\n")
    (folder / "table.md").write_text("| model | PSNR (dB) |\n|---|---|\n| <b>base</b> | 17.0 |\n")
    for name, colour in (("grid-real", "red"), ("grid-stage1", "blue"), ("plot-real", "green"), ("plot-stage1", "grey")):
        Image.new("RGB", (96, 32), colour).save(folder / f"{name}.png")


def _small_png(src: Path, dst: Path, width: int = 960):
    """A README copy: scaled to `width`, 64 colours (< 150 KB)."""
    from PIL import Image

    im = Image.open(src).convert("RGB")
    im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    im.quantize(64, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)


def job_state(p: Page, title: str) -> str:
    """The state of the newest job whose title starts with `title`, read from the job table's text
    (the header, then five cells a row, newest first; the table's rows are virtual)."""
    lines = p.css("#train-queue")[0].text.split("\n")
    cells = lines[lines.index("progress") + 1:]
    rows = [cells[i:i + 5] for i in range(0, len(cells) - 4, 5)]
    return next((r[3] for r in rows if r[2].startswith(title)), "")


def test_toy_walkthrough_in_a_browser(server, tmp_path_factory):
    found = _browser()
    if found is None or importlib.util.find_spec("selenium") is None:
        pytest.skip("no headless browser: needs Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver; .ci/run installs them) and selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    from cascade.toy.world import subject_photos

    url, runs, base = server
    photos = base / "photos"
    photos.mkdir()
    for i, im in enumerate(subject_photos()):
        im.save(photos / f"toy-{i}.png")
    huge = base / "huge.png"  # declares 20000x20000 pixels: refused in one line beside the photos
    huge.write_bytes(png_header(20000, 20000))
    secret = base / "secret.txt"  # named as the preset: its text never comes back
    secret.write_text("password = hunter2\nfoo: [\n")
    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(found[1]), options=opts)
    shots = tmp_path_factory.mktemp("ui-screenshots")
    p = Page(driver, shots)
    t0 = time.time()
    try:
        driver.get(url)
        # Subject: upload the 5 photos and a 20000x20000 PNG (refused by name); the CLI's checks pass
        upload = p.wait(lambda: p.css("#subject-upload input[type=file]")[0], 60, "the upload field")
        upload.send_keys("\n".join(str(f) for f in [*sorted(photos.iterdir()), huge]))
        folder = p.wait(lambda: p.value("subject-folder"), 60, "the uploaded subject folder")
        assert Path(folder).parent.parent == runs / ".cascade-ui" and len(list(Path(folder).iterdir())) == 5
        p.wait(lambda: p.images("subject-preview") == 5, 30, "the photos' preview")
        assert "huge.png: far over the 64 megapixel limit" in p.css("#msg-photos")[0].text
        p.type("subject-identifier", "the")  # a common word: the CLI's message, beside the field
        p.type("subject-preset", str(secret))  # any file as the preset: named, never quoted
        p.field("subject-preset").send_keys(Keys.ENTER)
        p.click("subject-check")
        p.wait(lambda: "is a common word" in p.css("#msg-identifier")[0].text, 60, "the identifier message")
        p.wait(lambda: "not valid YAML at line 2, column 4" in p.css("#msg-preset")[0].text, 60, "the preset message")
        assert "hunter2" not in driver.page_source
        assert p.css("#subject-verdict")[0].text == "fix the fields marked above: preset, identifier"
        p.choose("subject-preset", "toy")
        p.type("subject-identifier", "-sks")  # a value starting with '-': the job gets --identifier=-sks
        p.click("subject-check")
        p.wait(lambda: "passes" in p.css("#subject-verdict")[0].text, 60, "the checks to pass")
        p.shot("subject")

        # Train: stage I running, stage II queued: cancel stops stage I, resume continues stage I
        p.tab("Train")
        p.wait(lambda: [lb for lb in p.css("#train-stages label") if lb.text.strip() == "stage II"], 10,
               "stage II")[0].click()
        p.type("train-steps", "1000")
        p.click("train-start")
        p.wait(lambda: job_state(p, "stage 1:") == "running" and job_state(p, "stage 2:") == "queued", 60, "two jobs")
        p.click("train-cancel")
        p.wait(lambda: "cancelled job" in p.css("#train-msg")[0].text, 30, "the cancel")
        assert "(stage 1:" in p.css("#train-msg")[0].text
        p.wait(lambda: job_state(p, "stage 1:") == "cancelled" and job_state(p, "stage 2:") == "running", 60,
               "stage II to run")
        p.click("train-resume")
        p.wait(lambda: "(resumed)" in p.css("#train-msg")[0].text, 30, "the resume")
        assert "stage 1:" in p.css("#train-msg")[0].text
        for stage in ("stage 2:", "stage 1:"):  # stop both: stage II, then the resumed stage I
            p.wait(lambda: job_state(p, stage) == "running", 60, f"{stage} running")
            p.click("train-cancel")
            p.wait(lambda: "cancelled job" in p.css("#train-msg")[0].text and stage in p.css("#train-msg")[0].text,
                   30, f"the cancel of {stage}")
        p.wait(lambda: "running" not in [job_state(p, s) for s in ("stage 1:", "stage 2:")], 60, "the jobs to end")
        p.wait(lambda: [lb for lb in p.css("#train-stages label") if lb.text.strip() == "stage II"], 10,
               "stage II")[0].click()

        # Train: stage I, a few steps, no prior preservation (fast); grids every 2 steps
        p.type("train-steps", "4")
        p.wait(lambda: [lb for lb in p.css("label") if lb.text.strip() == "off"], 10, "radio")[0].click()
        p.type("train-extra", "stage1.train.sample_every=2\nstage1.train.checkpoint_every=2\n"
                              "stage1.train.validation_steps=5")
        p.click("train-start")
        p.wait(lambda: p.css("#train-progress-bar"), 120, "the progress bar")
        p.wait(lambda: p.css("#train-progress-text")[0].get_attribute("data-state") == "done", 300,
               "training to finish")
        p.wait(lambda: p.images("train-grids") >= 2 and p.images("train-loss") == 1, 30, "validation grids and loss.png")
        assert p.css("#train-loss-live canvas, #train-loss-live svg"), "the live loss plot"
        train_s = time.time() - t0
        p.shot("train")
        run = max(runs.glob("*-stage1-toy"))  # the newest: the cancelled one came before
        assert sorted(f.name for f in (run / "samples").glob("*.png")) == ["step-000002.png", "step-000004.png"]

        # Sample: the fine-tuned stage I, base stage II, 2 seeds side by side
        p.tab("Sample")
        p.choose("sample-stage1", run.name)
        p.type("sample-extra", "stage1.sample.steps=10\nstage2.sample.steps=5")
        p.click("sample-go")
        p.wait(lambda: p.images("sample-out1") == 2 and p.images("sample-out2") == 2, 180, "stage I and II samples")
        info = p.value("sample-info")
        assert "stage II noise level: 20" in info and "prompt: a -sks toy" in info  # the identifier typed
        # the noise slider re-samples; a <script> prompt is shown as the text typed, never run
        evil = '-a [V] toy <script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
        p.type("sample-prompt", evil)
        slider = p.css("#sample-noise input[type=range]")[0]
        ActionChains(driver).click_and_hold(slider).move_by_offset(-slider.size["width"] // 4, 0).release().perform()
        p.wait(lambda: "stage II noise level: 20\n" not in p.value("sample-info") and "<script>" in p.value("sample-info"),
               180, "the re-sample at the new level")
        assert "prompt: -a -sks toy <script>" in p.value("sample-info")  # a prompt starting with '-'
        assert driver.execute_script("return window.__xss === undefined")
        assert not driver.execute_script("return [...document.scripts].some(s => s.text.includes('__xss'))")
        assert p.images("sample-out2") == 2
        p.shot("sample")

        # Compare SR: a real `cascade study-sr` (one SR variant trained 1 step) when regenerating the
        # screenshots or with CASCADE_UI_FULL=1 (~1 min more); else a study folder written here, read generically
        p.tab("Compare SR")
        if FULL:
            p.type("compare-levels", "0,250")
            p.type("compare-variants", "low=0:0")
            p.type("compare-steps", "1")
            p.type("compare-extra", "stage1.sample.steps=5\nstage2.sample.steps=5\nstage2.train.validation_images=0")
            p.click("compare-go")
            p.wait(lambda: any(w in p.css("#compare-status")[0].text for w in ("done", "failed", "cancelled")), 400,
                   "the study")
            assert "done" in p.css("#compare-status")[0].text, p.css("#compare-status")[0].text
        else:
            _write_study(runs / "00009-study-sr-toy")
            p.tab("Runs")
            p.tab("Compare SR")  # the list is read again when the tab opens
        p.choose("compare-pick", "study-sr-toy")
        p.wait(lambda: p.images("compare-grids") >= 2 and p.images("compare-plots") >= 2, 30, "the study's images")
        assert "PSNR" in p.css("#compare-table")[0].text
        if not FULL:  # the written study's table holds markup, which must show as text
            assert "<b>base</b>" in p.css("#compare-table")[0].text
        assert "stripes" in p.css("#compare-results")[0].text  # the toy readers' column
        p.shot("compare")

        # Runs: the training run with its settings, loss and grids
        p.tab("Runs")
        p.choose("runs-pick", run.name)
        p.wait(lambda: p.images("runs-loss") == 1 and p.images("runs-validation") == 2, 30, "the run's loss and grids")
        assert "stage1" in p.css("#runs-settings")[0].text
        p.shot("runs")
        print(f"\nwalk-through: {time.time() - t0:.0f} s (training part {train_s:.0f} s); screenshots in {shots}")
    finally:
        driver.quit()
    if os.environ.get("CASCADE_UI_SCREENSHOTS"):
        out = Path(os.environ["CASCADE_UI_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(shots.glob("ui-*.png")):
            if f.stem != "ui-failure":
                _small_png(f, out / f.name)
                assert (out / f.name).stat().st_size < 150_000
