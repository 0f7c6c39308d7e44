"""The knob panel in a real browser: JupyterLab + headless Chromium driven by Playwright.

The test starts JupyterLab on 127.0.0.1 (a free port, a random token), writes a notebook that builds a `KnobPanel`
on a tiny random Llama with two alignment vectors and a level dial per domain, opens it in headless Chromium, runs
it, moves one slider with the keyboard and drags the other past the end of its track (so its value clamps), presses
Generate, chooses a level in a dial and a multidomain target in the menu, generates again, and checks the page (the
readouts, the chosen buttons, the answer, the judge's label) and the kernel side (the notebook writes what it
received, and how far the weights are from base + Σλ·AV, to a JSON file).

Needs Debian's `chromium` (apt) and the `browser` extra (`playwright`, `jupyterlab`); Playwright's own browser
download is not used. Skips with the reason when one is missing, except under CI (`AV_CI=1`, set by `.ci/run`),
where a missing piece is a failure. HOME, XDG_* and JUPYTER_* point into the test's temporary folder, so nothing is
written into the user's home.

Run it alone with `python -m pytest tests/test_panel_browser.py`."""
import json, os, re, secrets, shutil, signal, socket, subprocess, sys, textwrap, time, urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
START_TIMEOUT_S = 90   # JupyterLab up and answering
UI_TIMEOUT_MS = 60_000  # any one wait in the page (kernel start, running the notebook, a generation)
TARGET_0 = "medical=expert, legal=generic · reached · accuracy 90%"  # the first target's line in the menu

# The notebook under test: a tiny random model with two real alignment vectors (random "alignment"), real Knobs,
# a real judge and real records, and the panel. `RECEIVED` is where the kernel writes what the widgets sent it
# (the kernel may run widget callbacks in several threads: one lock around the file, events in the order they land).
SETUP = """\
import copy, json, threading, torch
from pathlib import Path
from av_nbdev.data import load_splits
from av_nbdev.models import TinyConfig, corpus_texts, nudged, tiny_llama, train_tokenizer
from av_nbdev.vectors import AlignmentVector
from av_nbdev.knobs import Knobs
from av_nbdev.judge import TfidfJudge
from av_nbdev.panel import KnobPanel
torch.set_num_threads(1)
splits = load_splits()
tok = train_tokenizer(corpus_texts(splits["train"][:60]))
base = tiny_llama(tok, TinyConfig(), seed=0).eval()
pristine = copy.deepcopy(base)
avs = {d: AlignmentVector.extract(base, nudged(base, i + 1, scale=0.05), domain=d) for i, d in enumerate(["medical", "legal"])}
knobs = Knobs(base, avs)
dial = {"medical": {"avoidance": {"medical": -1.0}, "generic": None, "expert": {"medical": 2.5}},
        "legal": {"avoidance": {"legal": 0.0}, "generic": {"legal": 1.25}, "expert": {"legal": 3.0}}}
targets = [{"target": {"medical": "expert", "legal": "generic"}, "lambdas": {"medical": 2.5, "legal": 1.25},
            "reached": True, "accuracy": 0.9},
           {"target": {"medical": "avoidance", "legal": "expert"}, "lambdas": {"medical": -0.75, "legal": 2.75},
            "reached": False, "accuracy": 0.4}]
panel = KnobPanel(knobs, tok, queries=splits["test"][:3], judge=TfidfJudge(splits["train"]),
                  records=splits["test"][:6], max_new_tokens=12, dial=dial, targets=targets)
"""

RECORD = """\
RECEIVED = Path(__RECEIVED__)
def gap():
    "Largest |θ − (θ_base + Σλ·AV)| over the parameters, at the knobs' λs."
    worst = 0.0
    for n, p in base.named_parameters():
        want = pristine.get_parameter(n).detach().clone()
        for k, lam in knobs.lambdas.items():
            if n in avs[k]: want += lam * avs[k][n]
        worst = max(worst, float((p.detach() - want).abs().max()))
    return worst
RECEIVED_LOCK = threading.Lock()
def record(event, weights=False, **kw):
    "Append an event with the knobs' λs (and, with `weights`, the weights' distance to base + Σλ·AV)."
    with RECEIVED_LOCK, knobs.lock:  # the knobs' lock: λs and weights as one state, not mid-move
        if weights: kw["gap"] = gap()
        seen = json.loads(RECEIVED.read_text()) if RECEIVED.exists() else []
        RECEIVED.write_text(json.dumps(seen + [{"event": event, "lambdas": knobs.lambdas, **kw}]))
for name, s in panel.sliders.items():
    s.observe(lambda ch, name=name: record("slider", name=name, value=ch["new"]), names="value")
# registered after the panel's own handlers, so they see the knobs once the choice has moved them
for domain, buttons in panel.dials.items():
    buttons.observe(lambda ch, domain=domain: record("dial", domain=domain, level=ch["new"], weights=True), names="value")
panel.target.observe(lambda ch: record("target", index=ch["new"], weights=True), names="value")
# registered after the panel's own handler, so it runs once the generation is done
panel.button.on_click(lambda _: record("generate", **panel.last))
panel
"""


def _missing()->str|None:
    "Why the test cannot run here, or None."
    if CHROMIUM is None: return "chromium is not installed (Debian: apt-get install -y chromium)"
    for mod in ("playwright", "jupyterlab", "ipykernel"):
        try: __import__(mod)
        except ImportError: return f"python package {mod} is missing (pip install -e '.[browser]')"
    return None


def _free_port()->int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_env(root:Path)->dict:
    "HOME, XDG_* and JUPYTER_* inside `root`, so neither the lab nor Chromium writes into the user's home."
    env = {}
    for var, sub in dict(HOME="home", XDG_CONFIG_HOME="xdg/config", XDG_DATA_HOME="xdg/data",
                         XDG_CACHE_HOME="xdg/cache", XDG_STATE_HOME="xdg/state", XDG_RUNTIME_DIR="xdg/run",
                         JUPYTER_CONFIG_DIR="jupyter/config", JUPYTER_DATA_DIR="jupyter/data",
                         JUPYTER_RUNTIME_DIR="jupyter/run", IPYTHONDIR="ipython", MPLCONFIGDIR="mpl",
                         JUPYTERLAB_SETTINGS_DIR="lab/settings", JUPYTERLAB_WORKSPACES_DIR="lab/workspaces").items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(root / sub)
    os.chmod(root / "xdg/run", 0o700)
    # no "get Jupyter news?" toast over the notebook
    news = root / "lab/settings/@jupyterlab/apputils-extension/notification.jupyterlab-settings"
    news.parent.mkdir(parents=True, exist_ok=True)
    news.write_text(json.dumps({"fetchNews": "false"}))
    return env


def _write_notebook(path:Path, received:Path):
    import nbformat
    cells = [nbformat.v4.new_code_cell(SETUP), nbformat.v4.new_code_cell(RECORD.replace("__RECEIVED__", repr(str(received))))]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = dict(name="python3", display_name="Python 3 (ipykernel)", language="python")
    nbformat.write(nb, path)


@pytest.fixture
def lab(tmp_path, monkeypatch):
    "A JupyterLab server on 127.0.0.1 serving `tmp_path/nb`; yields (url, token, notebook dir); always killed."
    if why := _missing():
        if os.environ.get("AV_CI"): pytest.fail(f"AV_CI is set and the browser test cannot run: {why}")
        pytest.skip(why)
    env = _private_env(tmp_path / "state")
    for k, v in env.items(): monkeypatch.setenv(k, v)  # Playwright's driver and Chromium inherit these too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb_dir = tmp_path / "nb"; nb_dir.mkdir()
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={nb_dir}", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    log_path = tmp_path / "lab.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: the kernel goes down with it
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
        yield url, token, nb_dir
    finally:
        _stop(proc, url, token, Path(env["JUPYTER_RUNTIME_DIR"]))


def _stop(proc, url:str, token:str, runtime_dir:Path):
    "Shut the lab down: ask it (it stops its kernels), then TERM/KILL its process group, then any stray kernel."
    try:
        req = urllib.request.Request(f"{url}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"})
        urllib.request.urlopen(req, timeout=5)
    except OSError: pass
    for sig, wait in ((None, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if sig is not None:
            try: os.killpg(proc.pid, sig)
            except ProcessLookupError: break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired: pass
    for pid in _kernel_pids(runtime_dir):  # kernels run in their own sessions
        try: os.kill(pid, signal.SIGKILL)
        except ProcessLookupError: pass


def _kernel_pids(runtime_dir:Path)->list[int]:
    "Processes whose command line names a connection file in `runtime_dir` (this test's kernels only)."
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(runtime_dir).encode() in cmdline.read_bytes(): pids.append(int(cmdline.parent.name))
        except OSError: pass
    return pids


def _page_report(page, folder:Path)->str:
    "What the notebook showed (outputs, errors included), and a screenshot beside it, for a failure message."
    try:
        page.screenshot(path=str(folder / "failure.png"))
        outputs = "\n---\n".join(page.locator(".jp-OutputArea-output").all_inner_texts())
    except Exception as e: outputs = f"(page unreadable: {e})"
    return f"screenshot: {folder / 'failure.png'}\nnotebook outputs:\n{outputs[-4000:]}"


def _wait_for(path:Path, done, timeout_s:float=30)->list:
    "The kernel's events once `done(events)` holds (its handler may still be writing when the page shows the answer)."
    deadline = time.monotonic() + timeout_s
    while True:
        try: events = json.loads(path.read_text())
        except (OSError, ValueError): events = []
        if done(events) or time.monotonic() > deadline: return events
        time.sleep(0.2)


def test_panel_in_jupyterlab(lab, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    url, token, nb_dir = lab
    received = tmp_path / "received.json"
    _write_notebook(nb_dir / "panel.ipynb", received)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=dict(width=1400, height=1000))
            page.set_default_timeout(UI_TIMEOUT_MS)
            expect.set_options(timeout=UI_TIMEOUT_MS)
            page.goto(f"{url}/lab/tree/panel.ipynb?token={token}&reset")
            expect(page.locator("#jp-main-statusbar")).to_contain_text("Idle")  # kernel started
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            sliders = page.locator(".widget-slider")
            expect(sliders).to_have_count(2)
            dials = page.locator(".knob-panel-dial")
            expect(dials).to_have_count(2)
            expect(dials.filter(has_text="medical").get_by_role("button")).to_have_count(2)  # generic: not reached
            expect(dials.filter(has_text="medical")).to_contain_text("not reached: generic")
            chart = page.locator("img.knob-panel-chart")  # the preference-share chart
            expect(chart).to_be_visible()
            answer = page.locator(".knob-panel-answer")
            before, chart_before = answer.inner_text(), chart.get_attribute("src")

            # legal: keyboard on the handle (End = the maximum, then two steps down)
            legal = sliders.filter(has_text="legal")
            handle = legal.locator(".noUi-handle")
            handle.focus()
            for key in ("End", "ArrowLeft", "ArrowLeft"): page.keyboard.press(key)
            expect(legal.locator(".widget-readout")).to_have_text("2.90")  # the range ends at 3

            # medical: drag the handle far past the left end of the track: the value clamps at the minimum
            medical = sliders.filter(has_text="medical")
            box = medical.locator(".noUi-handle").bounding_box()
            track = medical.locator(".noUi-base").bounding_box()
            y = box["y"] + box["height"] / 2
            page.mouse.move(box["x"] + box["width"] / 2, y)
            page.mouse.down()
            page.mouse.move(track["x"] - 300, y, steps=12)
            page.mouse.up()
            expect(medical.locator(".widget-readout")).to_have_text("−1.50")  # d3-format writes a real minus

            page.get_by_role("button", name="Generate").click()
            status = page.locator(".knob-panel-status")
            expect(status).to_contain_text("medical=-1.50")
            expect(status).to_contain_text("legal=+2.90")
            expect(page.locator(".knob-panel-label")).to_contain_text("judge:")
            shown, label = answer.inner_text(), page.locator(".knob-panel-label").inner_text()
            assert shown.strip() and shown != before
            assert chart.get_attribute("src") != chart_before  # redrawn at the new λs

            # the legal dial: "generic" sets legal to its setting, 1.25; medical stays
            chart_before = chart.get_attribute("src")
            generic = dials.filter(has_text="legal").get_by_role("button", name="generic", exact=True)
            generic.click()
            expect(legal.locator(".widget-readout")).to_have_text("1.25")
            expect(generic).to_have_class(re.compile(r"\bmod-active\b"))
            expect(medical.locator(".widget-readout")).to_have_text("−1.50")
            expect(chart).not_to_have_attribute("src", chart_before)
            _wait_for(received, lambda evs: any(e["event"] == "dial" and e["level"] == "generic" for e in evs))

            # a multidomain target sets both knobs; the medical dial then shows "expert", whose setting they hold
            page.locator(".knob-panel-target select").select_option(label=TARGET_0)
            expect(medical.locator(".widget-readout")).to_have_text("2.50")
            expect(legal.locator(".widget-readout")).to_have_text("1.25")
            expect(dials.filter(has_text="medical").get_by_role("button", name="expert", exact=True)).to_have_class(
                re.compile(r"\bmod-active\b"))
            page.get_by_role("button", name="Generate").click()
            expect(status).to_contain_text("medical=+2.50")
            expect(status).to_contain_text("legal=+1.25")
            page.locator(".knob-panel").screenshot(path=str(tmp_path / "panel.png"))  # for a look after the run
        except Exception as e:
            raise AssertionError(f"{e}\n{_page_report(page, tmp_path)}") from e
        finally:
            browser.close()

    events = _wait_for(received, lambda evs: sum(e["event"] == "generate" for e in evs) == 2)
    sliders_seen = [(e["name"], round(e["value"], 6)) for e in events if e["event"] == "slider"]
    assert ("medical", -1.5) in sliders_seen and ("legal", 2.9) in sliders_seen  # the drag and the keys, as sent
    gen = [e for e in events if e["event"] == "generate"]
    assert [g["lambdas"] for g in gen] == [{"medical": -1.5, "legal": pytest.approx(2.9)}, {"medical": 2.5, "legal": 1.25}]
    assert gen[0]["answer"] in shown and gen[0]["label"] in label  # the page shows what the kernel made
    # the dial and the target moved the weights themselves to base + Σλ·AV at their settings
    chosen = [e for e in events if e["event"] == "dial" and (e["domain"], e["level"]) == ("legal", "generic")]
    assert [(c["lambdas"], c["gap"] < 1e-6) for c in chosen] == [({"medical": -1.5, "legal": 1.25}, True)]
    target = [e for e in events if e["event"] == "target" and e["index"] == 0]
    assert [(t["lambdas"], t["gap"] < 1e-6) for t in target] == [({"medical": 2.5, "legal": 1.25}, True)]
