"""The tables the jobs print and the report renders from an evaluation summary.

`summary_table` formats `evaluation.json`'s summary rows (one per mode, U-HLM once per
threshold) as the paper's table (`SUMMARY_COLUMNS`), `accuracy_caption` says what its
accuracy columns measure, and `format_table` pads any table for a terminal.
"""

from __future__ import annotations

import math

import pandas as pd

from uhlm_jax import console
from uhlm_jax.modes import Mode

__all__ = [
    "SUMMARY_COLUMNS",
    "accuracy_caption",
    "format_table",
    "summary_table",
    "uhlm_label",
]

SUMMARY_COLUMNS = (
    "Mode",
    "TR",
    "Skip %",
    "Acceptance",
    "True skip rate",
    "Accuracy (MiniLM cosine)",
    "Accuracy (% of LLM)",
    "Correct answers",
    "LLM NLL (nats/token)",
    "Throughput (tokens/s)",
    "Speedup vs HLM",
    "Bound 1/(1−s)",
)


def _fmt(x: float | None, digits: int = 3) -> str:
    return console.number(x, f".{digits}f")


def _fmt_estimate(mean: float, standard_error: float, digits: int = 3) -> str:
    """`mean ± SE`, or "—" alone when the mean is undefined."""
    if mean is None or math.isnan(mean):
        return console.UNDEFINED
    return f"{_fmt(mean, digits)} ± {_fmt(standard_error, digits)}"


def accuracy_caption(summary: pd.DataFrame) -> str:
    """What the accuracy columns of `summary_table` measure, and on how many prompts."""
    llm = summary[summary["mode"] == Mode.LLM_ONLY.value].iloc[0]
    num_prompts = int(llm["prompts"])
    scored, answered = int(llm["accuracy_prompts"]), int(llm["correct_prompts"])
    if not scored and not answered:
        return "Accuracy and correct answers were not scored (--skip-accuracy)."
    return (
        "Accuracy (MiniLM cosine): mean cosine similarity of the all-MiniLM-L6-v2 sentence "
        f"embeddings of each reply and its prompt's reference, over the {scored} of "
        f"{num_prompts} prompts with a reference (± 1 SE over prompts); its % of LLM is "
        "the paper's \"% of LLM accuracy\". Correct answers: share of replies that "
        f"contain the prompt's short answer, over the {answered} of {num_prompts} prompts "
        "with one."
    )


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The paper-style table (`SUMMARY_COLUMNS`, formatted strings) of a summary frame."""
    llm = summary.loc[summary["mode"] == Mode.LLM_ONLY.value, "accuracy"]
    llm_accuracy = float(llm.iloc[0]) if len(llm) else float("nan")
    rows = []
    for r in summary.itertuples():
        rows.append([
            r.label, _fmt(r.transmission_rate), _fmt(100 * r.skip_rate, 1),
            _fmt(r.acceptance_rate), _fmt(r.true_skip_rate),
            _fmt_estimate(r.accuracy, r.accuracy_se),
            _fmt(100 * r.accuracy / llm_accuracy, 1) if llm_accuracy > 0 else console.UNDEFINED,
            _fmt_estimate(r.correct_rate, r.correct_rate_se, 2),
            _fmt_estimate(r.llm_nll, r.llm_nll_se, 2),
            _fmt(r.throughput_tokens_per_s, 2), _fmt(r.speedup_vs_hlm), _fmt(r.speedup_bound),
        ])
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def uhlm_label(name: str, threshold: float, failed_validation: bool = False) -> str:
    """The table label of U-HLM at a named threshold, flagged when it failed validation."""
    flag = ", failed validation" if failed_validation else ""
    return f"{Mode.UHLM.policy.label}, {name} (u_th = {threshold:.3f}{flag})"


def format_table(table: pd.DataFrame) -> str:
    """A plain-text table for a terminal: columns padded to their widest cell."""
    cells = [list(map(str, table.columns))] + [[str(v) for v in row] for row in
                                                table.itertuples(index=False)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
