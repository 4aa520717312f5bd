"""`uhlm evaluate`: the five modes with real rollouts on held-out prompts (toy pair)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from analysis import evaluate, tables
from analysis.cli import main as cli_main
from calibration import run_dir as rd
from tests.helpers import write_synthetic_run
from uhlm_jax.answers import AnswerMatch, is_correct
from uhlm_jax.models import sentence_encoder
from uhlm_jax.models.llama import forward
from uhlm_jax.models.sentence_encoder import (
    MINILM_INSTALL_COMMAND,
    load_minilm,
    sentence_similarity,
)
from uhlm_jax.pair import load_pair
from uhlm_jax.rollout import encode_prompts

# Same maths along another code path (batched and padded, or one row at a time).
FLOAT_ATOL = 2e-5
NUM_PROMPTS = 5
THRESHOLDS = {"analytic": {"risk_averse": {"threshold": -0.3},  # clipped to 0
                           "risk_prone": {"threshold": 1.7}},  # clipped to 1: skips all
              "posterior": {"risk_bounded": {"threshold": 0.45, "model": "hurdle"}},
              "ltt": {"threshold": None, "certified": False},
              "measure": "temperature_perturbation", "risk": 0.05, "confidence": 0.9}


def _thresholds_run(run_dir, th=THRESHOLDS):
    write_synthetic_run(run_dir)
    rd.write_json(run_dir / rd.THRESHOLDS_FILE, th)
    return run_dir


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    run_dir = _thresholds_run(tmp_path_factory.mktemp("evaluate"))
    cfg = evaluate.Config(run_dir=str(run_dir), num_prompts=NUM_PROMPTS, max_new_tokens=10)
    return run_dir, evaluate.run(cfg, progress=False)


def test_named_thresholds_are_read_and_clipped():
    def named_thresholds(th):
        return rd.Thresholds.from_json(th).named()

    assert named_thresholds(THRESHOLDS) == {
        "risk-averse": 0.0, "risk-prone": 1.0, "risk-bounded": pytest.approx(0.45)
    }
    certified = {**THRESHOLDS, "ltt": {"threshold": 0.3, "certified": True}}
    assert named_thresholds(certified)["Learn-then-Test"] == pytest.approx(0.3)
    assert named_thresholds({"analytic": {"risk_prone": {"threshold": None}}}) == {}


def test_every_mode_and_threshold_is_evaluated(evaluated):
    run_dir, result = evaluated
    summary, per_prompt = result.summary, result.per_prompt
    assert list(summary["mode"]) == ["llm_only", "slm_only", "hlm", "uhlm", "uhlm", "uhlm",
                                     "rand_hlm"]
    assert list(summary.loc[summary["mode"] == "uhlm", "threshold_name"]) == [
        "risk-averse", "risk-prone", "risk-bounded"]
    assert len(per_prompt) == 7 * NUM_PROMPTS
    assert result.operating.name == "risk-bounded"
    # Files: the per-prompt table and the summary read back with NaN and inf restored.
    on_disk = pd.read_parquet(run_dir / rd.EVALUATION_FILE)
    assert len(on_disk) == len(per_prompt)
    data, back = rd.read_evaluation_summary(run_dir)
    assert data["operating"] == "risk-bounded"
    llm = back[back["mode"] == "llm_only"].iloc[0]
    # LLM-only transmits every token and drafts none.
    assert llm["transmission_rate"] == 1.0 and llm["skip_rate"] == 0.0
    assert math.isnan(llm["acceptance_rate"]) and math.isnan(llm["speedup_bound"])
    assert back.loc[back["mode"] == "slm_only", "speedup_bound"].iloc[0] == math.inf
    np.testing.assert_allclose(back["accuracy"], summary["accuracy"])
    assert (back["accuracy_prompts"] == NUM_PROMPTS).all()
    assert back.loc[back["mode"] == "llm_only", "accuracy_pct_of_llm"].iloc[0] == 100.0


def test_skipping_everything_is_slm_only(evaluated):
    # u never exceeds 1, so U-HLM at threshold 1 emits exactly the SLM-only tokens.
    _, result = evaluated
    rows = result.per_prompt
    prone = rows[rows["threshold_name"] == "risk-prone"].reset_index(drop=True)
    slm = rows[rows["mode"] == "slm_only"].reset_index(drop=True)
    assert list(prone["response_tokens"].map(list)) == list(slm["response_tokens"].map(list))
    np.testing.assert_allclose(prone["similarity"], slm["similarity"], atol=FLOAT_ATOL)
    assert (prone["transmitted"] == 0).all()
    row = result.summary[result.summary["threshold_name"] == "risk-prone"].iloc[0]
    assert row["skip_rate"] == 1.0


def test_rand_hlm_transmits_at_the_operating_rate(evaluated):
    _, result = evaluated
    s = result.summary
    operating = s[s["threshold_name"] == "risk-bounded"].iloc[0]
    rand = s[s["mode"] == "rand_hlm"].iloc[0]
    assert rand["transmit_probability"] == pytest.approx(operating["transmission_rate"])


def test_accuracy_and_nll_match_one_row_at_a_time_oracles(evaluated):
    # Given the per-prompt rows of HLM
    _, result = evaluated
    pair = load_pair("toy")
    encoder = load_minilm()
    rows = result.per_prompt[result.per_prompt["mode"] == "hlm"]
    for row in rows.itertuples():
        # Then accuracy is MiniLM's sentence similarity of this reply to its reference alone
        expected = sentence_similarity(encoder, [row.text], [row.reference])[0]
        assert row.similarity == pytest.approx(expected, abs=FLOAT_ATOL)
        # And correctness is the containment check of the short answer
        assert row.answer  # the first shipped evaluation prompts all have one
        assert row.correct == float(is_correct(row.text, row.answer, AnswerMatch.CONTAINS))
        # And the NLL is the teacher-forced LLM's mean negative log-probability
        prompt = list(encode_prompts(pair, [row.prompt])[0])
        response = [int(t) for t in row.response_tokens]
        ids = np.asarray(prompt + response, np.int32)
        logits = forward(pair.llm, jnp.asarray(ids[None]), jnp.asarray([len(ids)]))[0]
        log_probs = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
        positions = np.arange(len(prompt) - 1, len(ids) - 1)
        nll = -log_probs[positions, ids[len(prompt):]].mean()
        assert row.llm_nll == pytest.approx(nll, abs=1e-4)


def test_summary_table_formats_percent_of_llm():
    summary = pd.DataFrame([
        {"label": "LLM only", "mode": "llm_only", "transmission_rate": 1.0,
         "skip_rate": 0.0, "acceptance_rate": math.nan, "true_skip_rate": math.nan,
         "accuracy": 0.8, "accuracy_se": 0.01, "correct_rate": 0.5, "correct_rate_se": 0.1,
         "llm_nll": 2.0, "llm_nll_se": 0.1,
         "throughput_tokens_per_s": 100.0, "speedup_vs_hlm": 5.0, "speedup_bound": math.nan},
        {"label": "SLM only", "mode": "slm_only", "transmission_rate": 0.0,
         "skip_rate": 1.0, "acceptance_rate": math.nan, "true_skip_rate": 0.3,
         "accuracy": 0.6, "accuracy_se": 0.02, "correct_rate": math.nan,
         "correct_rate_se": math.nan, "llm_nll": 9.0, "llm_nll_se": 0.5,
         "throughput_tokens_per_s": 40.0, "speedup_vs_hlm": 2.0, "speedup_bound": math.inf},
    ])
    table = tables.summary_table(summary)
    assert list(table.columns) == list(tables.SUMMARY_COLUMNS)
    assert table.iloc[1]["Accuracy (% of LLM)"] == "75.0"
    assert table.iloc[0]["Accuracy (MiniLM cosine)"] == "0.800 ± 0.010"
    assert table.iloc[0]["Correct answers"] == "0.50 ± 0.10"
    assert table.iloc[1]["Correct answers"] == "—"
    assert table.iloc[1]["Bound 1/(1−s)"] == "∞"
    assert table.iloc[0]["TR"] == "1.000" and table.iloc[0]["Acceptance"] == "—"
    assert table.iloc[1]["LLM NLL (nats/token)"] == "9.00 ± 0.50"
    text = tables.format_table(table)
    assert text.splitlines()[0].startswith("Mode") and "75.0" in text


def _main(argv):
    return cli_main(["evaluate", *argv])


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert _main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    write_synthetic_run(tmp_path)
    assert _main([str(tmp_path)]) == 2
    assert f"uhlm threshold --run {tmp_path}" in capsys.readouterr().err
    rd.write_json(tmp_path / rd.THRESHOLDS_FILE, {"analytic": {}})
    assert _main([str(tmp_path)]) == 2
    assert "no finite threshold" in capsys.readouterr().err
    assert _main([str(tmp_path), "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="num_prompts=0"):
        evaluate.Config(run_dir=str(tmp_path), num_prompts=0)


def test_pair_cost_profile_prices_the_runs_pair(tmp_path, capsys):
    # Given a run of the toy pair (V = 260)
    run_dir = _thresholds_run(tmp_path)
    # When `uhlm evaluate --cost-profile pair` runs
    argv = [str(run_dir), "--num-prompts", "2", "--max-new-tokens", "4", "--cost-profile", "pair"]
    assert _main(argv) == 0
    out = capsys.readouterr().out
    # Then the printed note, evaluation.json and the payload are the pair's
    caption = "cost profile 'pair' (pair toy): toy-slm float32 on phone-soc, toy-llm float32"
    assert f"Throughput and speedup: medium link, {caption}" in out and "V = 260." in out
    data, summary = rd.read_evaluation_summary(run_dir)
    assert data["settings"]["costs"].startswith(caption)
    slm_only = summary[summary["mode"] == "slm_only"].iloc[0]
    assert slm_only["uplink_bits_saved"] == slm_only["tokens"] * 260 * 16


def test_progress_counts_decode_steps_so_the_batched_sweep_weighs_its_points(tmp_path, capsys):
    # Given 2 prompts of 4 steps and 3 thresholds: LLM-only, a batched sweep of 5 points
    # (SLM-only, HLM and the 3 U-HLM thresholds) and Rand-HLM
    run_dir = _thresholds_run(tmp_path)
    argv = [str(run_dir), "--num-prompts", "2", "--max-new-tokens", "4", "--skip-accuracy"]
    assert _main(argv) == 0
    # Then progress moves once per rollout, by its rows times steps: 8, then 5 x 8, then 8
    lines = [line for line in capsys.readouterr().err.splitlines() if "evaluating modes" in line]
    done = [line.split("evaluating modes: ")[1].split(" step")[0] for line in lines]
    assert done == ["8/56", "48/56", "56/56"]


def test_named_cost_profile_is_stated_in_the_summary(evaluated):
    run_dir, result = evaluated
    assert result.costs.startswith("cost profile 'named': tinyllama-1.1b float16 on phone-soc")
    assert rd.read_evaluation_summary(run_dir)[0]["settings"]["costs"] == result.costs
    with pytest.raises(ValueError, match=r"'paper'.*named, pair"):
        evaluate.Config(run_dir=str(run_dir), cost_profile_name="paper")


def _write_prompts(path, records_):
    path.write_text("".join(json.dumps(r) + "\n" for r in records_))
    return str(path)


def test_prompts_without_a_reference_are_left_out_of_similarity(tmp_path, capsys):
    # Given two prompts: one with a reference, one with only a short answer
    run_dir = _thresholds_run(tmp_path)
    prompts = _write_prompts(tmp_path / "p.jsonl", [
        {"prompt": "What does CPU stand for?", "reference": "Central processing unit."},
        {"prompt": "Is ice cold?", "answer": "yes"},
    ])
    # When evaluate runs on them
    argv = [str(run_dir), "--prompts", prompts, "--split", "all", "--max-new-tokens", "4"]
    assert _main(argv) == 0
    out = capsys.readouterr().out
    # Then only the first is scored for similarity and only the second for correctness
    data, summary = rd.read_evaluation_summary(run_dir)
    per_prompt = pd.read_parquet(run_dir / rd.EVALUATION_FILE)
    for _, rows in per_prompt.groupby("label"):
        assert not np.isnan(rows["similarity"].iloc[0])
        assert np.isnan(rows["similarity"].iloc[1])
        assert np.isnan(rows["correct"].iloc[0]) and rows["correct"].iloc[1] in (0, 1)
    assert (summary["accuracy_prompts"] == 1).all() and (summary["correct_prompts"] == 1).all()
    np.testing.assert_allclose(summary["accuracy"], per_prompt.groupby("label", sort=False)[
        "similarity"].first().loc[summary["label"]], atol=FLOAT_ATOL)
    # And the printed note and evaluation.json state how many prompts were scored
    assert "over the 1 of 2 prompts with a reference" in out
    assert "over the 1 of 2 prompts with one" in out
    assert "1 of 2 prompts with a reference" in data["accuracy"]


def test_prompts_without_references_or_answers_need_skip_accuracy(tmp_path, capsys):
    # Given a prompt file with neither references nor short answers
    run_dir = _thresholds_run(tmp_path)
    prompts = _write_prompts(tmp_path / "bare.jsonl",
                             [{"prompt": "Tell me a story."}, {"prompt": "Say hello."}])
    argv = [str(run_dir), "--prompts", prompts, "--split", "all", "--max-new-tokens", "4"]
    # Then evaluate stops with one line naming the fields to add and the option to skip
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "'reference'" in err and "'answer'" in err and "--skip-accuracy" in err
    assert not (run_dir / rd.EVALUATION_SUMMARY_FILE).exists()
    # And with --skip-accuracy it reports the modes without accuracy
    assert _main([*argv, "--skip-accuracy"]) == 0
    out = capsys.readouterr().out
    assert "not scored (--skip-accuracy)" in out
    _, summary = rd.read_evaluation_summary(run_dir)
    assert summary["accuracy"].isna().all() and (summary["accuracy_prompts"] == 0).all()
    assert summary["llm_nll"].notna().all()


def test_missing_minilm_wheel_is_one_line_with_the_install_command(tmp_path, capsys,
                                                                 monkeypatch):
    run_dir = _thresholds_run(tmp_path)
    monkeypatch.setattr(sentence_encoder.importlib.util, "find_spec", lambda name: None)
    load_minilm.cache_clear()
    try:
        assert _main([str(run_dir), "--num-prompts", "2", "--max-new-tokens", "4"]) == 2
    finally:
        load_minilm.cache_clear()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and MINILM_INSTALL_COMMAND in err
