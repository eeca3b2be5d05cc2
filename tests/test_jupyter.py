"""Jupyter: the HTML views of models and results, the DSL's highlighter and the %%ppl cell
magic (through IPython's InteractiveShell when IPython is installed)."""
from __future__ import annotations

import html
import re

import pytest

import ppl
from ppl.compiler.highlight import tokens, to_html as highlight

COIN = """# a coin
def coin(flips, a=1):
    p ~ beta(a, 1)
    for f in flips:
        observe f ~ flip(p)
    return p
"""


# ------------------------------------------------------------------------ highlighter
def test_highlighter_covers_the_text_and_classifies_tokens():
    pieces = tokens(COIN)
    assert "".join(p for _, p in pieces) == COIN
    kinds = {p: k for k, p in pieces if k != "space"}
    assert kinds["# a coin"] == "comment"
    assert kinds["def"] == kinds["for"] == kinds["observe"] == kinds["return"] == "keyword"
    assert kinds["coin"] == "function"
    assert kinds["beta"] == kinds["flip"] == "distribution"
    assert kinds["~"] == "operator" and kinds["1"] == "number" and kinds["flips"] == "name"


def test_highlighter_never_fails_on_text_the_language_lacks():
    text = "def f():\n    return $$ + 'x'\n"
    pieces = tokens(text)
    assert "".join(p for _, p in pieces) == text
    assert pieces[-1] == ("text", "$$ + 'x'\n")
    assert "&#x27;x&#x27;" in highlight(text)  # escaped


# ------------------------------------------------------------------------- model HTML
def test_model_html_has_highlighted_source_entry_sites_and_graph():
    m = ppl.model(COIN)
    h = m.html({"flips": [1, 0, 1]})
    assert "entry <code>coin(flips, a=1)</code>" in h
    assert '<span class="ppl-distribution" style="color:#067d17">beta</span>' in h
    assert '<span class="ppl-keyword" style="color:#0033b3;font-weight:bold">observe</span>' in h
    rows = re.findall(r"<tr>(.*?)</tr>", h.split('class="ppl-sites"')[1])
    cells = [c for c in (re.findall(r">([^<]*)</td>", r) for r in rows) if c]
    assert ["p", "choice", "beta", "", ""] in cells
    assert any(c[1] == "observe" and c[2] == "flip" and "p" in c[3] and c[4] == "f" for c in cells)
    assert '<img class="ppl-graph"' in h and "data:image/png;base64," in h


def test_model_repr_html_without_data_shows_the_source_and_says_what_is_missing():
    h = ppl.model(COIN)._repr_html_()
    assert "ppl-source" in h and "ppl-graph" not in h
    assert "pass the data (flips)" in h  # a has a default


def test_model_html_falls_back_where_the_analysis_fails():
    m = ppl.model(COIN)
    h = m.html({"flips": 3})  # the analysis refuses these data: the source, and why no graph
    assert "ppl-source" in h and "ppl-graph" not in h
    assert "no graph: &lt;model&gt;:4:14: runtime error: cannot iterate over number" in h


# ------------------------------------------------------------------------ result HTML
def _cells(h: str) -> list[list[str]]:
    body = h.split('class="ppl-summary"')[1].split("</table>")[0]
    return [[html.unescape(c) for c in re.findall(r">([^<]*)</t[dh]>", r)] for r in re.findall(r"<tr>(.*?)</tr>", body)]


def test_result_html_table_has_the_numbers_of_summary():
    from ppl.results.text import summary_table
    r = ppl.model(COIN).run("importance", {"flips": [1, 0, 1, 1]}, particles=500, seed=2)
    h = r._repr_html_()
    assert h.startswith("<pre>") and html.escape(r._header()) in h
    header, rows, _ = summary_table(r)
    assert _cells(h) == [header] + rows
    text = r.summary()
    for row in rows:  # the same cells as the text summary
        assert all(c in text for c in row)
    assert '<img class="ppl-plot"' in h and "data:image/png;base64," in h


def test_exact_result_html_shows_fractions():
    r = ppl.model("def f():\n    a ~ flip(1/3)\n    b ~ flip(1/2)\n    condition a or b\n    return a\n").run("enumerate")
    rows = _cells(r._repr_html_())
    assert rows[1][:2] == ["return", "1/2"]  # P(a | a or b) = (1/3) / (2/3)


def test_result_html_shows_warnings_prominently():
    m = ppl.model("def f(y):\n    mu ~ normal(0, 10)\n    observe y ~ normal(mu, 0.01)\n    return mu\n")
    with pytest.warns(ppl.PPLDiagnosticWarning):
        r = m.run("importance", {"y": 3.0}, particles=50, seed=0)
    assert r.warnings
    h = r._repr_html_()
    box = h.split('class="ppl-warnings"')[1].split("</div>")[0]
    assert "this result may be unreliable" in box
    for w in r.warnings:
        assert html.escape(w) in box


def test_result_html_without_a_plot_when_plotting_fails(monkeypatch):
    r = ppl.model(COIN).run("importance", {"flips": [1]}, particles=20, seed=0)

    def broken(*a, **k):
        raise RuntimeError("no plot")
    monkeypatch.setattr(r, "plot", broken)
    h = r._repr_html_()
    assert "ppl-summary" in h and "ppl-plot" not in h


# ------------------------------------------------------------------------ %%ppl magic
@pytest.fixture(scope="module")
def shell():
    pytest.importorskip("IPython")
    from IPython.testing.globalipapp import start_ipython
    ip = start_ipython()
    ip.run_cell("%load_ext ppl")
    return ip


def test_magic_defines_a_model_in_the_namespace(shell):
    res = shell.run_cell("%%ppl coin_model\n" + COIN)
    assert res.success
    m = shell.user_ns["coin_model"]
    assert isinstance(m, ppl.Model) and m.entry == "coin" and m.params == ("flips", "a")
    res = shell.run_cell("%%ppl\ndef two():\n    x ~ flip(0.5)\n    return x\ndef one():\n    return 1\n")
    assert res.success and shell.user_ns["one"].entry == "one"  # no name: the entry's name
    res = shell.run_cell("%%ppl m2 --entry two\ndef two():\n    x ~ flip(0.5)\n    return x\ndef one():\n    return 1\n")
    assert res.success and shell.user_ns["m2"].entry == "two"
    assert shell.user_ns["m2"].run("enumerate").marginal() == {False: 0.5, True: 0.5}


def test_magic_errors_point_into_the_cell_without_a_traceback(shell, capsys):
    cell = "def f():\n    x ~ flip(0.5)\n    y = x +* 2\n    return y\n"
    res = shell.run_cell("%%ppl bad\n" + cell)
    err = res.error_in_exec
    assert isinstance(err, ppl.PPLSyntaxError)
    assert (err.span.line, err.span.col) == (3, 12)  # line 3 of the cell (after the %%ppl line)
    shown = err._render_traceback_()
    assert "<cell bad>:3:12" in shown[0]
    assert shown[1] == "    3 |     y = x +* 2"
    assert shown[2].index("^") == shown[1].index("*")  # the caret under the spot
    out = capsys.readouterr().out
    assert "Traceback" not in out and "<cell bad>:3:12" in out
    assert "bad" not in shell.user_ns


def test_magic_check_error_has_the_hint(shell, capsys):
    res = shell.run_cell("%%ppl\ndef f():\n    x ~ flip(0.5)\n    return xx\n")
    err = res.error_in_exec
    assert isinstance(err, ppl.PPLCheckError) and err.span.line == 3
    out = capsys.readouterr().out
    assert "<cell>:3:12" in out and "did you mean 'x'" in out and "Traceback" not in out


def test_magic_line_errors_are_usage_errors(shell, capsys):
    from IPython.core.error import UsageError
    res = shell.run_cell("%%ppl m --bogus\ndef f():\n    return 1\n")
    assert isinstance(res.error_in_exec, UsageError)
    res = shell.run_cell("%%ppl 3m\ndef f():\n    return 1\n")
    assert isinstance(res.error_in_exec, UsageError)


def test_model_html_skips_the_analysis_on_large_data(monkeypatch):
    from ppl import notebook
    monkeypatch.setattr(notebook, "MAX_DATA_ELEMENTS", 10)
    h = ppl.model(COIN).html({"flips": [1, 0] * 6})
    assert "ppl-source" in h and "ppl-sites" not in h and "the data hold 12 numbers" in h
    import numpy as np
    assert notebook._elements(np.zeros((3, 4))) == 12 and notebook._elements([[1, 2], [3]]) == 3


@pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning")
def test_mcmc_result_html_has_ess_and_r_hat_columns():
    from ppl.results.text import summary_table
    r = ppl.model(COIN).run("mh", {"flips": [1, 0, 1]}, particles=2, samples=40, seed=1)
    header, rows, _ = summary_table(r)
    assert header[6:8] == ["ess", "r_hat"]
    assert _cells(r._repr_html_()) == [header] + rows


def test_model_html_of_a_decorated_function_shows_its_python_defaults():
    @ppl.model
    def tosses(n=3):
        """
        k ~ binomial(n, 0.5)
        return k
        """
    h = tosses._repr_html_()
    assert "entry <code>tosses(n=3)</code>" in h and "ppl-sites" in h  # the defaults are data enough


def test_a_notebook_result_renders_in_a_browser_and_is_saved_under_docs():
    """What a notebook shows for a model and a result (their ``_repr_html_``), rendered by
    the system's Chromium through Playwright (as tests/test_playground.py does): the
    highlighted source, the sites table, the summary table with its numbers, and the
    warnings box are visible; the screenshot is docs/notebook_result.png."""
    import shutil
    from pathlib import Path
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no system Chromium (apt-get install chromium); .ci/run installs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; the `playground` extra)")
    m = ppl.model("def f(y):\n    mu ~ normal(0, 10)\n    observe y ~ normal(mu, 0.01)\n    return mu\n")
    with pytest.warns(ppl.PPLDiagnosticWarning):
        r = m.run("importance", {"y": 3.0}, particles=50, seed=0)
    page_html = ("<html><body style='font-family: sans-serif; max-width: 1100px'>"
                 "<div class='cell'>" + m.html({"y": 3.0}) + "</div><hr>"
                 "<div class='cell'>" + r._repr_html_() + "</div></body></html>")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1150, "height": 900})
            page.set_content(page_html)
            assert page.is_visible(".ppl-warnings")
            assert "this result may be unreliable" in page.text_content(".ppl-warnings")
            tables = page.eval_on_selector_all("table", "ts => ts.map(t => t.innerText)")
            assert any("mu" in t and "mean" in t for t in tables)
            assert page.is_visible("img.ppl-plot")
            docs = Path(__file__).resolve().parent.parent / "docs"
            page.screenshot(path=str(docs / "notebook_result.png"), full_page=True)
        finally:
            browser.close()
