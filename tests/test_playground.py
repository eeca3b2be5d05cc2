"""`ppl playground` (issue 13, item 7): the server's JSON API over real HTTP (a run with
its table, located errors with the caret, the caps, busy, the time limit, the gallery)
and the page in a real headless browser (the system's Chromium driven by Playwright):
type a model, Run, read the table; type a broken one, see the caret. The browser test
saves docs/playground.png and docs/playground_error.png."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from fractions import Fraction
from pathlib import Path

import pytest

from ppl.playground import Limits, serve
from ppl.playground.server import check_job, PlaygroundError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

TWO_COINS = """def two_coins():
    a ~ flip(0.5)
    b ~ flip(0.5)
    condition(a or b)
    return a + b
"""
BROKEN = """def broken():
    x ~ normal(0, -1)
    return x
"""
#: 4 million loop steps: far beyond a 2 s limit
SLOW = """def slow():
    s = 0
    for i in range(2000):
        for j in range(2000):
            s = s + 1
    x ~ normal(s, 1)
    return x
"""


def _start(limits: Limits):
    server = serve("127.0.0.1", 0, limits=limits, examples_dir=EXAMPLES)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server():
    s = _start(Limits(time_limit=60, max_particles=5000, max_samples=2000, max_body=200_000))
    yield s
    s.shutdown()
    s.server_close()


def post(server, path: str, body) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + path.lstrip("/"), data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def get(server, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.url + path.lstrip("/"), timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


# ----------------------------------------------------------------------------- the API
def test_run_answers_with_the_summary_table_and_the_exact_posterior(server):
    status, r = post(server, "/api/run", {"source": TWO_COINS, "data": "{}", "method": "enumerate"})
    assert status == 200 and r["ok"], r
    probs = r["result"]["posterior"]["return"]["probs"]
    assert probs == pytest.approx({"1": 2 / 3, "2": 1 / 3}, abs=1e-12)
    assert r["result"]["method"] == "enumerate" and r["result"]["entry"] == "two_coins"
    assert r["table"]["header"][0] == "name" and r["table"]["header"][-1] == "probabilities"
    rows = {row[0]: row for row in r["table"]["rows"]}
    assert rows["return"][-1] == "1: 2/3, 2: 1/3"  # exact enumeration: fractions
    assert r["header"].startswith("enumerate")
    assert r["plot"].startswith("data:image/png;base64,") and r["graph"].startswith("data:image/png;base64,")


def test_run_binds_the_data_box_and_reports_the_model_output(server):
    source = 'def coin(flips):\n    p ~ beta(1, 1)\n    for f in flips:\n        observe f ~ flip(p)\n' \
             '    print("p is", p)\n    return p\n'
    status, r = post(server, "/api/run", {"source": source, "data": '{"flips": [true, true, false]}',
                                          "method": "importance", "particles": 2000, "seed": 1, "graph": False})
    assert status == 200 and r["ok"], r
    assert r["result"]["n"] == 2000 and r["result"]["seed"] == 1 and r["graph"] is None
    # Beta(3, 2): mean 0.6, sd 0.2; 2000 weighted particles (ESS > 1000): 5 standard errors
    post_p = r["result"]["posterior"]["p"]
    assert abs(post_p["mean"] - 0.6) < 5 * 0.2 / (r["result"]["ess"] ** 0.5)
    assert "p is" in r["output"] and "[particle 0]" in r["output"]


def test_a_runtime_error_comes_back_located_with_the_caret(server):
    status, r = post(server, "/api/run", {"source": BROKEN, "method": "importance", "particles": 10})
    assert status == 400 and r["ok"] is False
    e = r["error"]
    assert (e["file"], e["line"], e["col"]) == ("model.ppl", 2, 5)
    assert e["kind"] == "runtime error" and "scale" in e["message"] and e["hint"]
    assert e["source_line"] == "    x ~ normal(0, -1)"
    assert e["caret"] == "    " + "^" * len("x ~ normal(0, -1)")
    assert e["text"].startswith("model.ppl:2:5: runtime error:")


def test_a_syntax_error_and_a_data_error_are_located(server):
    status, r = post(server, "/api/run", {"source": "def m(:\n    return 1\n"})
    e = r["error"]
    assert status == 400 and e["kind"] == "syntax error" and (e["line"], e["col"]) == (1, 7)
    assert e["caret"] == "      ^"
    status, r = post(server, "/api/run", {"source": TWO_COINS.replace("two_coins()", "two_coins(n)"),
                                          "data": '{"m": 1}'})
    e = r["error"]
    assert status == 400 and (e["file"], e["line"], e["col"]) == ("data.json", 1, 2)
    assert e["caret"] == " ^^^" and e["hint"] == "its parameters are: n"
    status, r = post(server, "/api/run", {"source": TWO_COINS.replace("two_coins()", "two_coins(n)"),
                                          "data": "{}"})
    assert status == 400 and r["error"]["hint"].startswith("add it to the data box")
    status, r = post(server, "/api/run", {"source": TWO_COINS, "data": '{\n  "x": [1,\n}'})
    e = r["error"]
    assert status == 400 and (e["file"], e["line"]) == ("data.json", 3) and "invalid JSON" in e["message"]


def test_caps_on_particles_samples_and_the_body_are_named(server):
    status, r = post(server, "/api/run", {"source": TWO_COINS, "method": "importance", "particles": 5001})
    assert status == 422 and r["error"]["kind"] == "limit"
    assert "5,001" in r["error"]["message"] and "cap of 5,000" in r["error"]["message"]
    assert "--max-particles" in r["error"]["hint"]
    status, r = post(server, "/api/run", {"source": TWO_COINS, "method": "mh", "particles": 2, "samples": 2001})
    assert status == 422 and "samples=2,001" in r["error"]["message"] and "cap of 2,000" in r["error"]["message"]
    status, r = post(server, "/api/run", {"source": TWO_COINS, "method": "nuts", "options": '{"warmup": 3000}'})
    assert status == 422 and "warmup=3,000" in r["error"]["message"]
    status, r = post(server, "/api/run", {"source": TWO_COINS, "method": "enumrate"})
    assert status == 400 and r["error"]["hint"] == "did you mean 'enumerate'?"
    # a body above the cap is refused before it is read
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.putrequest("POST", "/api/run")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10 ** 9))
    conn.endheaders()
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and "1,000,000,000 bytes" in body["error"]["message"]
    assert "cap of 200,000 bytes" in body["error"]["message"]


def test_check_job_caps_chains_and_rejects_bad_numbers():
    limits = Limits(max_particles=10)
    with pytest.raises(PlaygroundError, match="chains=11 is above the playground's cap of 10"):
        check_job({"source": TWO_COINS, "method": "mh", "particles": 2, "options": {"chains": 11}}, limits)
    with pytest.raises(PlaygroundError, match="particles must be a whole number"):
        check_job({"source": TWO_COINS, "particles": 1.5}, limits)
    with pytest.raises(PlaygroundError, match="the model is empty"):
        check_job({"source": "  "}, limits)
    job = check_job({"source": TWO_COINS, "method": "mh", "particles": "4", "samples": "100", "burn_in": ""}, limits)
    assert job["particles"] == 4 and job["options"] == {"samples": 100}
    job = check_job({"source": TWO_COINS, "particles": None, "seed": ""}, Limits())  # empty fields: defaults
    assert (job["method"], job["particles"], job["seed"]) == ("importance", 1000, 0)


def test_busy_and_the_time_limit(server):
    answers = {}

    def slow_run():
        answers["slow"] = post(server, "/api/run", {"source": SLOW, "method": "importance", "particles": 1})
    server.runner.workers[0].ensure_started()  # the limit counts the run, not the worker's start
    server.limits.time_limit = 2  # the module's server, with a 2 s limit for this test
    try:
        thread = threading.Thread(target=slow_run)
        thread.start()
        deadline = time.time() + 10
        while not server.runner.running and time.time() < deadline:
            time.sleep(0.02)
        status, r = post(server, "/api/run", {"source": SLOW, "method": "importance", "particles": 1})
        assert status == 429 and r["error"]["kind"] == "busy"
        assert "this model is already running" in r["error"]["message"]
        status, r = post(server, "/api/run", {"source": TWO_COINS, "method": "enumerate"})
        assert status == 429 and "busy with 1 other run" in r["error"]["message"]
        thread.join(60)
    finally:
        server.limits.time_limit = 60
    status, r = answers["slow"]
    assert status == 504 and r["error"]["kind"] == "time limit"
    assert "time limit of 2 s" in r["error"]["message"] and "--time-limit" in r["error"]["hint"]
    # the killed worker is replaced: the next run works
    status, r = post(server, "/api/run", {"source": TWO_COINS, "method": "enumerate", "plot": False, "graph": False})
    assert status == 200 and r["result"]["posterior"]["return"]["probs"]["1"] == pytest.approx(2 / 3)


def test_a_worker_that_dies_is_an_error_and_is_replaced(server):
    """A worker killed mid-run (out of memory, say) is a clear error, and the next run works."""
    answers = {}
    worker = server.runner.workers[0]
    worker.ensure_started()
    thread = threading.Thread(target=lambda: answers.update(
        slow=post(server, "/api/run", {"source": SLOW, "method": "importance", "particles": 1})))
    thread.start()
    deadline = time.time() + 10
    while not server.runner.running and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    worker.process.kill()
    thread.join(60)
    status, r = answers["slow"]
    assert status == 500 and r["error"]["kind"] == "internal error"
    assert "ended without an answer" in r["error"]["message"]
    status, r = post(server, "/api/run", {"source": TWO_COINS, "method": "enumerate", "plot": False, "graph": False})
    assert status == 200 and r["ok"]


def test_the_gallery_lists_the_examples_with_their_data_and_settings(server):
    status, r = get(server, "/api/examples")
    names = {e["name"]: e for e in r["examples"]}
    assert status == 200 and set(names) == {p.stem for p in EXAMPLES.glob("*.ppl")}
    assert names["coin"]["has_data"] and names["coin"]["title"] == "how biased is this coin?"
    status, coin = get(server, "/api/examples/coin")
    assert coin["source"] == (EXAMPLES / "coin.ppl").read_text()
    assert json.loads(coin["data"]) == json.loads((EXAMPLES / "coin.json").read_text())
    assert coin["method"] == "importance" and coin["particles"] == 5000  # 100000 in its Run line, capped
    status, dice = get(server, "/api/examples/dice")
    assert dice["method"] == "enumerate"
    status, ar = get(server, "/api/examples/ar")
    assert (ar["method"], ar["particles"], ar["samples"], ar["burn_in"]) == ("nuts", 4, 1000, 1000)
    for bad in ("nope", "..%2Fpyproject", "coin.ppl"):
        status, r = get(server, "/api/examples/" + bad)
        assert status == 404 and r["ok"] is False


@pytest.mark.parametrize("name", ["medical", "trick_coin"])
def test_a_gallery_example_runs_as_model_run_does(server, name):
    """The page's Run on an example with its own settings answers what Model.run answers."""
    import ppl
    status, ex = get(server, "/api/examples/" + name)
    body = {k: ex.get(k) for k in ("source", "data", "method", "particles", "seed", "options")}
    status, r = post(server, "/api/run", {**body, "plot": False, "graph": False})
    assert status == 200 and r["ok"], r
    direct = ppl.model(str(EXAMPLES / f"{name}.ppl")).run(ex["method"], json.loads(ex["data"])).to_json()
    assert r["result"]["posterior"] == direct["posterior"] and r["result"]["log_evidence"] == direct["log_evidence"]


def test_highlight_info_page_and_origin(server):
    status, r = post(server, "/api/highlight", {"source": TWO_COINS})
    assert "".join(piece for _, piece in r["tokens"]) == TWO_COINS
    kinds = {piece: kind for kind, piece in r["tokens"]}
    assert kinds["def"] == "keyword" and kinds["flip"] == "distribution" and kinds["~"] == "operator"
    status, info = get(server, "/api/info")
    assert info["methods"][:5] == ["enumerate", "importance", "smc", "mh", "nuts"]
    assert info["limits"]["max_particles"] == 5000
    with urllib.request.urlopen(server.url, timeout=30) as page:
        html = page.read().decode()
    assert "<textarea id=\"source\"" in html and "http" not in html.replace(server.url, "")  # nothing from outside
    req = urllib.request.Request(server.url + "api/highlight", data=b"{}",
                                 headers={"Origin": "http://evil.example", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 403
    req = urllib.request.Request(server.url + "api/highlight", data=b"{}",
                                 headers={"Host": "rebound.example", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 403 and "rebound.example" in json.load(err.value)["error"]["message"]


def test_cli_playground_serves_and_stops():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ppl", "playground", "--port", "0", "--no-browser"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = proc.stderr.readline()
        assert line.startswith("ppl playground on http://127.0.0.1:"), line
        url = line.split()[3]
        with urllib.request.urlopen(url, timeout=30) as page:
            assert "ppl playground" in page.read().decode()
    finally:
        proc.send_signal(2)  # Ctrl-C
        out = proc.communicate(timeout=30)[1]
    assert proc.returncode == 0 and "stopped" in out
    bad = subprocess.run([sys.executable, "-m", "ppl", "playground", "--time-limit", "0"], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    assert bad.returncode == 1 and "--time-limit must be a positive number" in bad.stderr


def test_worker_notes_keep_ppl_warnings_and_drop_library_deprecations():
    import warnings as w
    from ppl.playground.worker import _messages, error_json
    from ppl.semantics.errors import ZeroEvidenceError
    caught = [w.WarningMessage("torch.jit.script is deprecated", UserWarning, "/x/site-packages/torch/jit.py", 1),
              w.WarningMessage("old", DeprecationWarning, "/work/ppl/api.py", 1),
              w.WarningMessage("proposal ignored", UserWarning, "/work/ppl/inference/smc.py", 1),
              w.WarningMessage("proposal ignored", UserWarning, "/work/ppl/inference/smc.py", 2)]
    assert _messages(caught) == ["proposal ignored"]
    e = error_json(ZeroEvidenceError("every particle has weight zero", hint="check the conditions"))
    assert e == {"kind": "runtime error", "message": "every particle has weight zero", "hint": "check the conditions",
                 "text": "runtime error: every particle has weight zero\nhint: check the conditions"}


# ------------------------------------------------------------------------- the browser
def _browser():
    if CHROMIUM is None:
        pytest.skip("no system Chromium (apt-get install chromium); .ci/run installs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; the `playground` extra)")
    return sync_playwright, CHROMIUM


def _save_screenshot(page, path) -> None:
    """The page's screenshot at ``path``, unless the one there differs from it in fewer than
    0.1% of its pixels (anti-aliasing varies by a few pixels from run to run: the committed
    picture changes only when the page does)."""
    import io
    import matplotlib.image as mpimg
    import numpy as np
    png = page.screenshot(full_page=True)
    if path.exists():
        old, new = mpimg.imread(str(path)), mpimg.imread(io.BytesIO(png), format="png")
        if old.shape == new.shape and (np.abs(old - new).sum(-1) > 0).mean() < 1e-3:
            return
    path.write_bytes(png)


def test_in_a_headless_browser_type_run_read_the_table_and_see_an_error(server):
    sync_playwright, chromium = _browser()
    docs = ROOT / "docs"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            # the gallery is one click away: the coin example is loaded at the start, dice on a click
            assert page.input_value("#source") == (EXAMPLES / "coin.ppl").read_text()
            page.click("button[data-example='dice']")
            page.wait_for_function("document.getElementById('model-name').textContent === 'dice.ppl'")
            assert page.input_value("#source") == (EXAMPLES / "dice.ppl").read_text()
            assert page.input_value("#method") == "enumerate"
            assert not page.is_visible("#particles") and not page.is_visible("#samples")  # exact: no sizes
            page.select_option("#method", "nuts")
            assert page.text_content("#particles-name") == "Chains" and page.is_visible("#samples")
            page.select_option("#method", "pmmh")  # particles per likelihood estimate, and samples
            assert page.text_content("#particles-name") == "Particles" and page.is_visible("#samples")
            # type a model, pick a method, run, read the table
            page.fill("#source", "")
            page.click("#source")
            page.keyboard.type(TWO_COINS)
            assert page.input_value("#source").startswith("def two_coins():")
            assert page.text_content("#model-name") == "dice.ppl (edited)"
            page.fill("#data", "{}")
            page.select_option("#method", "enumerate")
            page.click("#run")
            page.wait_for_selector("#table tbody tr", timeout=60_000)
            page.wait_for_function("!document.getElementById('run').disabled")
            cells = page.eval_on_selector_all("#table tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
            rows = {r[0]: r for r in cells}
            assert rows["return"][-1] == "1: 2/3, 2: 1/3"  # exact enumeration: fractions
            assert page.is_visible("#plot") and page.is_visible("#graph")
            page.wait_for_selector("#highlight .tk-distribution")  # the server's highlighting arrived
            assert page.text_content("#status").startswith("done in ")
            # the run time is masked so the committed screenshot changes only when the page does
            page.eval_on_selector("#status", "e => e.textContent = 'done in 0.10 s'")
            _save_screenshot(page, docs / "playground.png")
            # a broken model: the error with the source line and the caret under the spot
            page.fill("#source", BROKEN)
            page.click("#run")
            page.wait_for_selector("#error:not([hidden]) pre.excerpt", timeout=60_000)
            loc = page.text_content("#error .loc")
            excerpt = page.text_content("#error pre.excerpt")
            assert loc.startswith("model.ppl:2:5: runtime error:")
            line, caret = excerpt.split("\n")
            assert line.endswith("|     x ~ normal(0, -1)")
            assert caret.index("^") == line.index("x ~ normal") and caret.rstrip().endswith("^" * 17)
            assert "hint:" in page.text_content("#error .hint")
            assert page.is_visible("#error-mark") and not page.is_visible("#results")
            _save_screenshot(page, docs / "playground_error.png")
        finally:
            browser.close()
