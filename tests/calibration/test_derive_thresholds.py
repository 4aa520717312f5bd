"""Tests of the `uhlm threshold` job: the paper's hand-checked thresholds, bad input, and
a run directory end to end with the split validation checked against a direct count."""

import argparse
import json

import jax.numpy as jnp
import numpy as np
import pytest

from analysis.cli import main as cli_main
from calibration import derive_thresholds as th
from calibration import fit, records
from calibration import run_dir as rd
from tests.helpers import synthetic_records, write_run
from uhlm_jax import rejection
from uhlm_jax import threshold as T

# Realised risks are float32 sums over a few thousand tokens.
RISK_ATOL = 1e-5
# Splits on which the tests refit a NUTS model (each refit takes seconds).
REFIT_SPLITS = 2


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    th.add_arguments(parser)
    return parser.parse_args(argv)


def test_paper_thresholds_from_the_command_line(capsys):
    # Given the paper's fit, When thresholds are asked for as JSON
    assert th.main(parse(["--slope", "0.82", "--intercept", "-0.06", "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    # Then the risk-averse threshold is 0.0732 and no risk-prone one is computed.
    assert round(out["risk_averse"]["threshold"], 4) == 0.0732 and "risk_prone" not in out
    assert out["risk_averse"]["reason"] is None
    assert (
        th.main(parse(["--slope", "0.82", "--intercept", "-0.06", "--delta", "0.29", "--json"]))
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert round(out["risk_averse"]["threshold"], 4) == 0.0732
    assert round(out["risk_prone"]["threshold"], 4) == 0.4268
    assert th.main(parse(["--slope", "0.82", "--intercept", "-0.06", "--delta", "0.29"])) == 0
    text = capsys.readouterr().out
    assert "0.0732" in text and "0.4268" in text


def test_a_clipped_paper_threshold_says_why(capsys):
    # Given a line whose risk-prone crossing (Δ − b)/a = (0.54 − 0.02)/0.5 lies beyond 1
    argv = ["--slope", "0.5", "--intercept", "0.02", "--delta", "0.54"]
    assert th.main(parse([*argv, "--json"])) == 0
    prone = json.loads(capsys.readouterr().out)["risk_prone"]
    # Then the JSON and the text give the raw value, the clipped one and the reason.
    assert prone["threshold"] == 1.0 and prone["raw"] == pytest.approx(1.04)
    assert prone["reason"] == "(Δ − b)/a = 1.04 > 1: risk-prone skips everything (SLM-only)"
    assert th.main(parse(argv)) == 0
    assert "= 1.0000 ((Δ − b)/a = 1.04 > 1: risk-prone skips everything" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--slope", "-0.5", "--intercept", "0.1"], "slope -0.5 must be > 0"),
        (["--slope", "0", "--intercept", "0.1"], "slope 0.0 must be > 0"),
        (["--slope", "0.8"], "need both slope and intercept"),
        (["--slope", "0.8", "--intercept", "0", "--delta", "1.2"], "delta .* must lie in"),
        (["--slope", "0.8", "--intercept", "0", "--risk", "0"], "risk must lie in \\(0, 1\\)"),
        (["--run", "x", "--risk", "1.5"], "risk must lie in \\(0, 1\\), got 1.5"),
        (["--run", "x", "--confidence", "1"], "confidence must lie in \\(0, 1\\), got 1.0"),
        (["--run", "x", "--slope", "1", "--intercept", "0"], "not both"),
        (["--run", "x", "--splits", "20"], "--splits must be an int >= 100"),
        ([], "give --slope A --intercept B, or --run RUN_DIR"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert cli_main(["threshold", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("uhlm threshold: error: ")
    assert __import__("re").search(message, err), err


def test_missing_run_dir_is_exit_2(tmp_path, capsys):
    assert cli_main(["threshold", "--run", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    """A run of 240 prompts × 12 tokens of hurdle data, fitted with a small NUTS budget."""
    run_dir = tmp_path_factory.mktemp("run")
    write_run(run_dir, synthetic_records(np.random.default_rng(7), 240, 12))
    fit.run(
        fit.Config(
            run_dir=str(run_dir), num_warmup=200, num_samples=200, svi_steps=500, num_bootstrap=50
        )
    )
    return run_dir


def test_run_mode_writes_thresholds_json(fitted_run, capsys):
    cfg = ["--run", str(fitted_run), "--risk", "0.05", "--confidence", "0.9", "--splits", "100",
           "--refit-splits", str(REFIT_SPLITS)]
    # config.json counts one prompt more than the records hold.
    config = fitted_run / rd.CONFIG_FILE
    original = config.read_text()
    rd.write_json(config, {"num_prompts": 241})
    try:
        assert th.main(parse(cfg + ["--json"])) == 0
    finally:
        config.write_text(original)
    printed, err = capsys.readouterr()
    printed = json.loads(printed)
    summary = json.loads((fitted_run / rd.THRESHOLDS_FILE).read_text())
    assert printed == summary
    assert summary["measure"] == "temperature_perturbation"
    assert "cover 240 of the 241 prompts" in summary["records_warning"]
    warning, *progress = err.splitlines()
    assert warning == summary["records_warning"]
    assert summary["data"] == {
        "num_tokens": 2880,
        "num_prompts": 240,
        "mean_beta": pytest.approx(summary["data"]["mean_beta"]),
    }
    post = summary["posterior"]["linear"]
    lo, hi = post["risk_averse"]["interval"]
    assert 0 <= lo <= post["risk_averse"]["mean"] <= hi <= 1
    # With 240 prompts the distribution-free bound certifies some skipping.
    ltt = summary["ltt"]
    assert ltt["certified"] and ltt["pvalue"] <= 0.1 and ltt["empirical"]["per_token"] <= 0.05
    assert ltt["reason"] is None and ltt["prompts_needed"] <= 240
    # The paper's thresholds carry their raw values; a clipped one says why.
    for rule in ("risk_averse", "risk_prone"):
        block = summary["analytic"][rule]
        inside = 0 <= block["raw"] <= 1
        assert (block["reason"] is None) == inside
        assert block["threshold"] == pytest.approx(min(max(block["raw"], 0), 1), abs=1e-6)
    # The risk-bounded threshold in use is the model's that predicts best (hurdle data here).
    fitted = json.loads((fitted_run / rd.FIT_FILE).read_text())["comparison"]
    choice = summary["posterior"]["model_choice"]
    assert choice["model"] == fitted["best"] == "hurdle"
    assert choice["comparison"] == fitted["table"]
    chosen = summary["posterior"]["risk_bounded"]
    assert chosen == {**summary["posterior"]["hurdle"]["risk_bounded"], "model": "hurdle"}
    for model in th.MODELS:
        bounded = summary["posterior"][model]["risk_bounded"]
        if bounded["threshold"] is None:
            continue
        assert bounded["probability_within_risk"] >= 0.9
        # The pooled posteriors are narrow enough that even the 95% point is within ε; a
        # new prompt's risk (prompt-effect models) is bounded only at the 90% point.
        if model in ("linear", "hurdle"):
            assert bounded["posterior_risk"]["interval"][1] <= 0.05 + 1e-6
    # A prompt-effect model's risk is a new prompt's: at least as uncertain as its pooled
    # twin's at every threshold
    for pooled in ("linear", "hurdle"):
        within = summary["posterior"][pooled]["curve"]["probability_within_risk"]
        new = summary["posterior"][f"{pooled}_prompt"]["curve"]["probability_within_risk"]
        assert summary["posterior"]["risk"][f"{pooled}_prompt"].startswith("risk of a new")
        assert len(new) == len(within) == 101
    # Curves for plots: one value per grid threshold, monotone where they must be.
    assert len(summary["grid"]["values"]) == 101
    per_token = np.asarray(summary["empirical_curve"]["per_token"])
    assert per_token.size == 101 and np.all(np.diff(per_token) >= 0)
    assert summary["empirical_curve"]["skip_rate"][-1] == pytest.approx(1.0)
    assert len(ltt["curve"]["pvalues"]) == 101
    within = np.asarray(post["curve"]["probability_within_risk"])
    assert np.all(np.diff(within) <= 0) and within[0] == 1.0
    validation = summary["validation"]
    assert validation["num_splits"] == 100 and validation["calibration_prompts"] == 120
    # The validation refits the model whose threshold is in use, a progress line per split
    assert validation["risk_bounded_model"] == choice["model"]
    refits = REFIT_SPLITS if choice["model"] != "linear" else 0
    assert len(progress) == refits
    assert all(f"threshold: refit {choice['model']} by NUTS" in line for line in progress)
    for method in th.METHODS:
        m = validation["methods"][method]
        splits = REFIT_SPLITS if method == "risk_bounded" and choice["model"] != "linear" else 100
        assert len(m["realised_risk_per_token"]) == splits == m["num_splits"]
        assert len(m["thresholds"]) == splits
        assert 0 <= m["exceed_frequency_per_token"] <= 1
    # The analytic risk-prone threshold carries no guarantee and skips most tokens.
    assert validation["methods"]["analytic_risk_prone"]["mean_skip_rate"] > 0.5
    # The human-readable form names every method.
    text = th.format_summary(summary)
    assert all(name in text for name in th.METHODS)
    assert "from the hurdle model, which predicts best (highest elpd_loo)" in text
    # The typed view reads back what was written.
    view = rd.Thresholds.read(fitted_run)
    assert (view.measure, view.risk, view.confidence) == ("temperature_perturbation", 0.05, 0.9)
    assert view.ltt_certified and view.ltt.threshold == ltt["threshold"]
    assert view.ltt.empirical.per_token == ltt["empirical"]["per_token"]
    assert view.risk_bounded.threshold == post["risk_bounded"]["threshold"]
    assert view.risk_prone.threshold == summary["analytic"]["risk_prone"]["threshold"]
    assert view.plug_in.slope == summary["analytic"]["slope"]
    assert view.validation.allowed_exceed_frequency == pytest.approx(0.1)
    for method in th.METHODS:
        m = validation["methods"][method]
        assert view.validation.methods[method].exceed_frequency_per_prompt == m[
            "exceed_frequency_per_prompt"]
        assert view.validation.methods[method].realised_risk_per_token == tuple(
            m["realised_risk_per_token"])
    assert rd.operating_threshold(view).name is rd.ThresholdName.LEARN_THEN_TEST


def test_split_validation_matches_a_direct_count(fitted_run):
    cfg = th.Config(run_dir=str(fitted_run), num_splits=100, refit_splits=REFIT_SPLITS)
    summary = json.loads((fitted_run / rd.THRESHOLDS_FILE).read_text())
    if summary["validation"]["num_splits"] != 100:
        summary = th.run(cfg).summary
    df = records.read_records(fitted_run)
    _, prompt = np.unique(df["prompt_id"], return_inverse=True)
    u = df["u_temperature_perturbation"].to_numpy(np.float32)
    beta = df["beta"].to_numpy(np.float32)
    masks = th.split_masks(cfg, 240)
    for split in (0, 57):
        test_tokens = masks[split][prompt] == 0
        for method in th.METHODS:
            m = summary["validation"]["methods"][method]
            if split >= m["num_splits"]:
                continue
            t = m["thresholds"][split]
            skipped = np.zeros_like(u, bool) if t is None else u <= np.float32(t)
            expected = (beta * skipped)[test_tokens].sum() / test_tokens.sum()
            assert m["realised_risk_per_token"][split] == pytest.approx(expected, abs=RISK_ATOL)
            per_prompt = [
                (beta * skipped)[prompt == i].mean() for i in range(240) if masks[split][i] == 0
            ]
            assert m["realised_risk_per_prompt"][split] == pytest.approx(
                np.mean(per_prompt), abs=RISK_ATOL
            )
        # LTT on the calibration prompts alone gives the same threshold.
        cal = masks[split][prompt] == 1
        alone = json.loads(json.dumps(_ltt_alone(u[cal], beta[cal], prompt[cal])))
        assert summary["validation"]["methods"]["ltt"]["thresholds"][split] == alone


def _ltt_alone(u, beta, prompt):
    import jax.numpy as jnp

    from uhlm_jax import threshold as T

    _, dense = np.unique(prompt, return_inverse=True)
    grid = T.threshold_grid(101)
    risks = T.prompt_risk_curves(
        jnp.asarray(u), jnp.asarray(beta), jnp.asarray(dense), int(dense.max()) + 1, grid
    )
    t = float(T.ltt_threshold(risks, grid, jnp.float32(0.05), jnp.float32(0.1)).threshold)
    return None if t == T.NO_SKIP else t


@pytest.mark.parametrize("model", ["hurdle", "hurdle_prompt", "linear_prompt"])
def test_a_split_refit_sees_exactly_its_calibration_prompts(model):
    # Given records of 6 prompts and a split keeping prompts 1, 2 and 4
    df = synthetic_records(np.random.default_rng(3), 6, 9)
    data = th._load_data(df, "temperature_perturbation")
    mask = np.array([0, 1, 1, 0, 1, 0], np.float32)
    cal = mask[data.prompt] == 1
    # When the model's statistics are masked to the split
    _, masked = th._masked_model(model, data, rd.Fit())
    got = masked(mask)
    # Then they equal the statistics of the calibration tokens alone
    if model == "linear_prompt":
        alone = rejection.prompt_linear_stats(
            data.u[cal], data.beta[cal], data.prompt[cal], data.num_prompts
        )
        for field in ("n", "suu", "sub", "sbb"):
            np.testing.assert_allclose(getattr(got, field), getattr(alone, field), atol=1e-6)
        return
    if model == "hurdle":
        alone = rejection.hurdle_groups(data.u[cal], data.beta[cal])
        present = np.isin(got.u, alone.u)
        assert np.all(got.count[~present] == 0)
        got = got._replace(**{f: getattr(got, f)[present] for f in got._fields})
    else:
        alone, _ = rejection.hurdle_prompt_groups(data.u[cal], data.beta[cal], data.prompt[cal])
        got = got._replace(**{f: getattr(got, f)[got.count > 0] for f in got._fields})
    for field in alone._fields:
        np.testing.assert_allclose(getattr(got, field), getattr(alone, field), rtol=1e-6)


def test_measure_mismatch_is_an_error_and_keeps_files(fitted_run, capsys):
    before = {p.name: p.read_bytes() for p in fitted_run.iterdir() if p.is_file()}
    assert cli_main(["threshold", "--run", str(fitted_run), "--measure", "entropy"]) == 2
    assert "fitted for measure 'temperature_perturbation'" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in fitted_run.iterdir() if p.is_file()}
    assert after == before


@pytest.mark.slow
def test_run_mode_fits_first_when_fit_is_missing(tmp_path, capsys):
    write_run(tmp_path, synthetic_records(np.random.default_rng(8), 16, 16))
    argv = ["--run", str(tmp_path), "--json", "--refit-splits", str(REFIT_SPLITS)]
    assert th.main(parse(argv)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (tmp_path / rd.FIT_FILE).is_file() and (tmp_path / rd.THRESHOLDS_FILE).is_file()
    assert summary["ltt"]["num_prompts"] == 16
    # Sixteen prompts are too few to certify anything at the default level.
    assert summary["ltt"]["threshold"] is None and not summary["ltt"]["certified"]


def test_coverage_with_known_risk_ltt_bounded_and_posterior_reported(record_property):
    # Given prompts of T tokens with u uniform on {k/20} and β = clip(a u + b + σ ε, 0, 1),
    # whose risk R(t) = E[β 1{u ≤ t}] is known in closed form
    import math

    import jax
    import jax.numpy as jnp

    from uhlm_jax import threshold as T

    a, b, sigma, eps, delta = 0.82, -0.06, 0.15, 0.05, 0.1
    reps, prompts, tokens = 200, 200, 10
    values = np.arange(21) / 20

    def clipped_mean(mu):
        phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
        cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
        pos = lambda m: m * cdf(m / sigma) + sigma * phi(m / sigma)  # noqa: E731
        return pos(mu) - pos(mu - 1)

    mean_beta = np.array([clipped_mean(a * v + b) for v in values])

    def true_risk(t):
        return 0.0 if not np.isfinite(t) else mean_beta[values <= t + 1e-7].sum() / 21

    rng = np.random.default_rng(11)
    u = rng.integers(0, 21, (reps, prompts * tokens)) / 20
    beta = np.clip(a * u + b + sigma * rng.standard_normal(u.shape), 0, 1)
    u, beta = u.astype(np.float32), beta.astype(np.float32)
    prompt = jnp.repeat(jnp.arange(prompts), tokens)
    grid = T.threshold_grid(101)

    # When each replication calibrates LTT and the linear posterior risk-bounded threshold
    u64, b64 = u.astype(np.float64), beta.astype(np.float64)
    post = rejection.conjugate_posterior(
        np.full(reps, prompts * tokens),
        u64.sum(1),
        b64.sum(1),
        (u64 * u64).sum(1),
        (u64 * b64).sum(1),
        (b64 * b64).sum(1),
    )
    slope, intercept, _ = rejection.sample_conjugate(rng, post, 400)

    def one(u_r, beta_r, a_r, b_r):
        risks = T.prompt_risk_curves(u_r, beta_r, prompt, prompts, grid)
        t_ltt = T.ltt_threshold(risks, grid, jnp.float32(eps), jnp.float32(delta)).threshold
        curves = jax.vmap(T.linear_risk_curve, in_axes=(0, 0, None, None))(
            a_r, b_r, T.weighted_sample(u_r), grid
        )
        t_post = T.grid_threshold(grid, T.risk_bounded_index(curves, eps, delta))
        return t_ltt, t_post

    t_ltt, t_post = (
        np.asarray(x)
        for x in jax.jit(jax.vmap(one))(
            jnp.asarray(u),
            jnp.asarray(beta),
            jnp.asarray(slope, jnp.float32),
            jnp.asarray(intercept, jnp.float32),
        )
    )
    ltt_violation = np.mean([true_risk(t) > eps for t in t_ltt])
    posterior_violation = np.mean([true_risk(t) > eps for t in t_post])
    record_property("ltt_violation_frequency", float(ltt_violation))
    record_property("posterior_violation_frequency", float(posterior_violation))
    print(f"violation frequency: LTT {ltt_violation:.3f}, posterior {posterior_violation:.3f}")
    # Then LTT violates in at most δ of replications (plus Monte Carlo error) and skips
    assert ltt_violation <= delta + 4 * math.sqrt(delta * (1 - delta) / reps)
    assert np.mean(np.isfinite(t_ltt)) > 0.9
    # and the posterior threshold is a real threshold whose frequency is reported.
    assert np.all(np.isfinite(t_post)) and 0.0 <= posterior_violation <= 1.0


def test_plan_prompts_says_how_many_prompts_learn_then_test_needs(tmp_path, capsys):
    # Given a pilot of 16 prompts, too few to certify at ε = 0.05, δ = 0.1
    write_run(tmp_path, synthetic_records(np.random.default_rng(8), 16, 16))
    argv = ["--run", str(tmp_path), "--plan-prompts", "--max-plan-prompts", "3000"]
    # When the plan is asked for
    assert th.main(parse([*argv, "--json"])) == 0
    summary = json.loads(capsys.readouterr().out)
    # Then it reads the records alone: no fit, nothing written
    assert summary["mode"] == "plan"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "records"]
    ltt = summary["ltt"]
    assert not ltt["certified"] and ltt["num_prompts"] == 16
    # and the fewest prompts that certify anything is the library's sample-size answer.
    needed = T.ltt_prompts_needed(
        jnp.asarray(ltt["curve"]["risk_hat"], jnp.float32),
        jnp.float32(0.05),
        jnp.float32(0.1),
        3000,
    )
    assert ltt["prompts_needed"] == int(needed[0]) > 16
    assert f"would certify with {ltt['prompts_needed']} prompts" in ltt["reason"]
    steps = ltt["plan"]["steps"]
    assert steps[0]["prompts"] == ltt["prompts_needed"]
    assert all(a["prompts"] < b["prompts"] and a["threshold"] < b["threshold"]
               for a, b in zip(steps, steps[1:], strict=False))  # fmt: skip
    assert all(s["risk_hat"] < 0.05 for s in steps)
    # The text form gives the reason and the table.
    assert th.main(parse(argv)) == 0
    text = capsys.readouterr().out
    assert "Learn-then-Test: none (skip nothing): with 16 prompts" in text
    assert f"{steps[0]['prompts']:>8}  {steps[0]['threshold']:>12.4f}" in text


def test_plan_prompts_needs_a_run(capsys):
    assert cli_main(["threshold", "--slope", "0.8", "--intercept", "0", "--plan-prompts"]) == 2
    assert "--plan-prompts needs a pilot run" in capsys.readouterr().err
