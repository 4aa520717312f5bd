"""`uhlm report` as sections: their order and contents, table layout in HTML and Markdown,
example responses, Learn-then-Test's reason, and flags on a threshold that failed its
validation."""

import math
from html.parser import HTMLParser

import pandas as pd
import pytest

from analysis import plots, report
from calibration import run_dir as rd
from tests.helpers import write_synthetic_run

PROMPTS, TOKENS = 12, 20
EPS, CONFIDENCE = 0.05, 0.9
# Learn-then-Test certifies nothing at ε with fewer than ⌈log δ / log(1 − ε)⌉ prompts
# (the p-value of a risk-free curve is (1 − ε)^n): 45 at ε = 0.05, δ = 0.1.
LTT_FEWEST = math.ceil(math.log(1 - CONFIDENCE) / math.log(1 - EPS))
SPLITS = 20
# LTT skipped nothing in every split (mean skip rate 0) although the file does not count
# its no-skip splits; the risk-bounded threshold operates and fails its validation, the
# risk-averse one passes.
THRESHOLDS = {
    "measure": "temperature_perturbation", "risk": EPS, "confidence": CONFIDENCE,
    "analytic": {"slope": 0.8, "intercept": -0.06, "rejection_share": 0.4,
                 "risk_averse": {"threshold": 0.075}, "risk_prone": {"threshold": 0.575}},
    "posterior": {"linear": {"risk_bounded": {"threshold": 0.25}},
                  "risk_bounded": {"threshold": 0.25, "model": "linear"}},
    "ltt": {"threshold": None, "certified": False},
    "validation": {
        "num_splits": SPLITS, "calibration_prompts": 6, "test_prompts": 6,
        "allowed_exceed_frequency": 0.1,
        "methods": {
            "ltt": {"exceed_frequency_per_token": 0.0, "exceed_frequency_per_prompt": 0.0,
                    "mean_skip_rate": 0.0, "realised_risk_per_token": [0.0] * SPLITS},
            "posterior_linear": {"exceed_frequency_per_token": 0.45,
                                 "exceed_frequency_per_prompt": 0.3, "mean_skip_rate": 0.5,
                                 "realised_risk_per_token": [0.04, 0.06] * (SPLITS // 2)},
            "analytic_risk_averse": {"exceed_frequency_per_token": 0.02,
                                     "exceed_frequency_per_prompt": 0.01,
                                     "mean_skip_rate": 0.2,
                                     "realised_risk_per_token": [0.01] * SPLITS},
        },
    },
}
# A response that must be escaped in HTML, and whose pipe and newline must not break a
# Markdown table row.
HOSTILE = "<script>alert('x')</script> a|b\nnext line & more"
MODES = ("LLM only", "SLM only", "HLM", "U-HLM, risk-averse (u_th = 0.075)")
EVALUATED_PROMPTS = report.EXAMPLE_PROMPTS + 1


def _responses() -> pd.DataFrame:
    rows = []
    for p in range(EVALUATED_PROMPTS):
        for m, label in enumerate(MODES):
            rows.append({
                "mode": "uhlm", "label": label, "prompt_id": 1_000_000 + p,
                "prompt": f"Question number {p}?", "reference": f"Answer {p}.",
                "text": HOSTILE if (p, m) == (0, 1) else f"reply {p}-{m}",
                "similarity": 0.5 + 0.01 * m, "correct": m == 0,
            })
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A report of a synthetic run with thresholds, validation and evaluated responses,
    with the arguments the report passed to the plots that show thresholds."""
    run_dir = tmp_path_factory.mktemp("sections")
    write_synthetic_run(run_dir, prompts=PROMPTS, tokens=TOKENS)
    rd.write_json(run_dir / rd.THRESHOLDS_FILE, THRESHOLDS)
    rd.write_parquet(_responses(), run_dir / rd.EVALUATION_FILE)
    calls = {}

    def spy(name):
        real = getattr(plots, name)

        def record(*args, **kwargs):
            calls[name] = kwargs
            return real(*args, **kwargs)

        return record

    def sections(cfg, data):
        calls["data"], calls["sections"] = data, real_sections(cfg, data)
        return calls["sections"]

    real_sections = report.sections
    with pytest.MonkeyPatch.context() as mp:
        for name in ("risk_histograms", "u_beta", "throughput_vs_snr"):
            mp.setattr(plots, name, spy(name))
        mp.setattr(report, "sections", sections)
        result = report.run(report.Config(run_dir=str(run_dir)))
    return {
        "sections": calls["sections"], "result": result, "calls": calls, "data": calls["data"],
        "markdown": result.markdown.read_text(), "html": result.html.read_text(),
    }


class _Tables(HTMLParser):
    """Each table's rows as lists of (tag, class, text)."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = [tag, dict(attrs).get("class"), ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[2] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(tuple(self._cell))
            self._cell = None


def _html_tables(text: str) -> list[list[list[tuple[str, str, str]]]]:
    parser = _Tables()
    parser.feed(text)
    return parser.tables


def test_sections_come_in_reading_order_with_their_figures_and_notes(written):
    sections = written["sections"]
    # Given the sections of a run, the report reads in this order, notes last
    assert [s.title for s in sections] == [
        f"U-HLM report: {written['data'].run_dir.name}",
        "Modes on held-out prompts (real rollouts)",
        "Example responses",
        "Modes by trace replay of the calibration records",
        "Replay against real rollouts",
        "Thresholds",
        "Fit",
        "Uncertainty measures",
        "Configuration",
        "Notes",
    ]
    assert sections[0].level == 1 and all(s.level == 2 for s in sections[1:])
    # Each figure sits in the section it illustrates, and every figure was written
    figures = {s.title: [f.path.name for f in s.figures] for s in sections}
    assert figures["Thresholds"] == ["risk_histograms.png"]
    assert figures["Fit"] == ["u_beta.png"]
    assert figures["Uncertainty measures"] == ["measure_comparison.png"]
    assert "throughput_vs_snr.png" in figures["Modes by trace replay of the calibration records"]
    assert [p.name for p in written["result"].plots] == [
        name for names in figures.values() for name in names]
    assert all(p.stat().st_size > 0 for p in written["result"].plots)
    # The mode table is the replay section's first table, and the notes gather every
    # section's notes
    replay = sections[3]
    assert list(replay.tables[0].frame.columns) == list(report.MODE_TABLE_COLUMNS)
    gathered = [n for s in sections[:-1] for n in s.notes]
    assert list(sections[-1].body) == gathered == list(written["result"].notes)
    assert any("No fit.json" in n for n in gathered)


def test_html_tables_keep_labels_on_one_line_and_align_headers_with_cells(written):
    text = written["html"]
    assert ".label{text-align:left;white-space:nowrap}" in text
    assert ".num{text-align:right}" in text
    tables = _html_tables(text)
    assert tables
    for table in tables:
        header, *rows = table
        kinds = [cls for tag, cls, _ in header]
        assert kinds[0] == "label" and all(tag == "th" for tag, _, _ in header)
        # Every cell of a column has the class (and so the alignment) of its header
        for row in rows:
            assert [cls for _, cls, _ in row] == kinds
    mode_table = next(t for t in tables if [c[2] for c in t[0]] == list(
        report.MODE_TABLE_COLUMNS))
    assert [c[1] for c in mode_table[0]] == ["label"] + ["num"] * 8
    # And Markdown states the same alignment
    assert ("| " + " | ".join([":---"] + ["---:"] * 8) + " |") in written["markdown"]


def test_render_aligns_by_column_content():
    # Given a table with a label, a number and a text column
    table = report.Table(pd.DataFrame({"Mode": ["U-HLM, a long label"], "x": [0.5],
                                       "Note": ["why"]}))
    html = report.render_html([report.Section("T", (table,))], "T")
    (header, row), = _html_tables(html)
    # Then headers and cells agree: label, number, text
    assert [c[1] for c in header] == [c[1] for c in row] == ["label", "num", "text"]
    assert report.render_markdown([report.Section("T", (table,))], None).splitlines()[3] == (
        "| :--- | ---: | :--- |")


def test_example_responses_show_each_mode_escaped(written):
    section = next(s for s in written["sections"] if s.title == "Example responses")
    # Given four evaluated prompts, the first EXAMPLE_PROMPTS are shown, each with every
    # mode's response
    assert len(section.tables) == report.EXAMPLE_PROMPTS
    for table in section.tables:
        assert list(table.frame["Mode"]) == list(MODES)
        assert list(table.frame["Correct"]) == ["yes", "no", "no", "no"]
    assert "Question number 3?" not in written["markdown"]
    md = written["markdown"]
    assert "> Question number 0?" in md and "> Answer 0." in md
    assert "| reply 2-3 |" in md
    # A hostile response is escaped in HTML and stays in one Markdown row
    html = written["html"]
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; a|b\nnext line &amp; more" in html
    assert ("| SLM only | <script>alert('x')</script> a\\|b next line & more | 0.510 | no |"
            in md)


def test_examples_say_how_to_get_them_without_an_evaluation(tmp_path):
    write_synthetic_run(tmp_path)
    cfg = report.Config(run_dir=str(tmp_path))
    data = report.gather(cfg)
    assert data.responses is None
    section = report._examples_section(report._context(cfg, data))
    assert section.tables == () and "run `uhlm evaluate RUN_DIR`" in section.body[0]


def test_learn_then_test_says_why_it_certified_nothing(written):
    expected = (f"certified nothing (skips nothing): it needs ≥ {LTT_FEWEST} prompts at "
                f"ε = {EPS:g}, δ = {1 - CONFIDENCE:g}; the run has {PROMPTS}")
    md = written["markdown"]
    assert f"| Learn-then-Test | — | — | — | — | P(R ≤ {EPS}) ≥ {CONFIDENCE}, " in md
    assert f"| {expected} |" in md
    assert f"No Learn-then-Test row: Learn-then-Test {expected}." in md
    # With enough prompts for a risk-free curve, the reason is the observed risk
    th = rd.Thresholds.from_json({
        "risk": EPS, "confidence": CONFIDENCE,
        "ltt": {"threshold": None, "certified": False, "num_prompts": 60,
                "reason": "the p-value of the smallest threshold is 0.2 > delta"}})
    assert report.ltt_note(th) == (
        f"certified nothing (skips nothing) with 60 prompts at ε = {EPS:g}, "
        f"δ = {1 - CONFIDENCE:g}: the p-value of the smallest threshold is 0.2 > delta")
    assert report.ltt_note(rd.Thresholds.from_json(
        {"ltt": {"threshold": 0.2, "certified": True, "num_prompts": 60}})) == (
        "certified with 60 prompts")


def test_risk_legend_says_a_method_skipped_nothing(written):
    no_skip = written["calls"]["risk_histograms"]["no_skip"]
    # LTT's mean skip rate is 0: it skipped nothing in every split, whatever the file counts
    assert no_skip == {"ltt": 1.0, "posterior_linear": 0.0, "analytic_risk_averse": 0.0}
    assert "exceeds ε" not in plots.risk_legend_label("ltt", 0.0, no_skip["ltt"])
    assert ("| ltt | 0.000 | 0.000 | 0.000 | — | skipped nothing in every split: risk 0 by "
            "construction, no saving |") in written["markdown"]


def test_a_threshold_that_failed_validation_is_flagged_where_it_is_shown(written):
    md, calls = written["markdown"], written["calls"]
    # The summary flags it and names the threshold that passed
    summary = written["sections"][0].body[0]
    assert "Warning: the risk-bounded threshold FAILED its validation" in summary
    assert "Thresholds that passed: risk-averse (u_th = 0.075)." in summary
    # The replay table and its text
    assert "| U-HLM, risk-bounded (u_th = 0.250, failed validation) |" in md
    assert "At the operating threshold (which failed its validation) U-HLM skips" in md
    # The thresholds table
    assert ("| P(R ≤ 0.05 \\| data) ≥ 0.9 under the linear model | FAILED (exceeds ε in 45% of "
            f"{SPLITS} splits; allowed δ = 10%) |") in md
    assert f"| none (plug-in) | passed (exceeds ε in 2% of {SPLITS} splits) |" in md
    # The figures that mark it
    assert calls["u_beta"]["thresholds"]["risk-bounded (failed validation)"] == 0.25
    assert calls["throughput_vs_snr"]["threshold_label"] == "u_th = 0.250, failed validation"
    assert calls["u_beta"]["operating"].name == "risk-bounded (failed validation)"
