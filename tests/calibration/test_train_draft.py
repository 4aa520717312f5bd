"""`uhlm train-draft`: loss and acceptance oracles, and smoke runs on the toy model."""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analysis.cli import main as cli_main
from calibration import train_draft
from uhlm_jax.models import early_exit as ee
from uhlm_jax.models.llama import forward
from uhlm_jax.models.registry import load_model
from uhlm_jax.uncertainty import exact_fractions

# KL and acceptance of two float32 evaluations of the same network.
EXACT_ATOL = 1e-4
# KL computed by two float32 routes (fused logits vs. a NumPy float64 reference).
KL_RTOL = 1e-4
# A linear map recovered by float64 least squares from float32 inputs.
RECOVERY_ATOL = 1e-3

TOY = "toy-llm"
PROMPTS = [
    ("Name a colour.", "train"),
    ("Count to three.", "train"),
    ("Say hello.", "train"),
    ("Spell cat.", "train"),
    ("Name a fruit.", "calibration"),
    ("Say goodbye.", "evaluation"),
]


@pytest.fixture(scope="module")
def toy():
    return load_model(TOY)


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    with open(path, "w") as f:
        for prompt, split in PROMPTS:
            f.write(json.dumps({"prompt": prompt, "reference": "x", "split": split}) + "\n")
    return str(path)


def _config(prompts_file, workdir, toy, **overrides):
    settings = dict(
        model=TOY,
        prompts=prompts_file,
        exit_layer=max(toy.params.config.num_layers - 2, 0),
        samples_per_prompt=1,
        max_new_tokens=6,
        epochs=2,
        batch_size=2,
        warmup_steps=1,
        checkpoint_every=1,
        workdir=str(workdir),
        output=str(workdir / "head.safetensors"),
    )
    return train_draft.Config(**{**settings, **overrides})


def test_train_and_heldout_keeps_splits_disjoint(prompts_file):
    train, heldout = train_draft.train_and_heldout(prompts_file)
    assert [p.text for p in train] == [p for p, s in PROMPTS if s == "train"]
    assert [p.text for p in heldout] == ["Name a fruit.", "Say goodbye."]
    assert [p.split for p in heldout] == ["calibration", "evaluation"]


def test_train_and_heldout_reads_alpaca_records_and_needs_both_parts(tmp_path):
    # Given Alpaca records, one without a split (so held out),
    path = tmp_path / "alpaca.jsonl"
    records = [
        {"instruction": "Add.", "input": "1 + 1", "output": "2", "split": "train"},
        {"instruction": "Name a colour.", "output": "red"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    # then the instruction and input form the prompt,
    train, heldout = train_draft.train_and_heldout(str(path))
    assert [p.text for p in train] == ["Add.\n\n1 + 1"]
    assert [p.text for p in heldout] == ["Name a colour."]
    # and a file with no held-out prompts is refused, naming the file.
    path.write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(ValueError, match="no held-out prompts"):
        train_draft.train_and_heldout(str(path))


def test_reply_weights_by_hand():
    # Row 0: prompt of 2 ids, 5 ids in all: columns 1, 2, 3 predict the reply ids 2, 3, 4.
    weights = train_draft._reply_weights([5, 3], [2, 3], 6)
    np.testing.assert_array_equal(weights, [[0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])


def test_clustered_mean_by_hand():
    # Two sequences of two tokens with acceptance sums 1 and 2: mean 3/4; residuals ±0.5,
    # se² = 2/1 · 0.5 / 4² = 1/16.
    mean, se = train_draft.clustered_mean(np.array([1.0, 2.0]), np.array([2.0, 2.0]))
    assert mean == pytest.approx(0.75) and se == pytest.approx(0.25)


def _log_softmax64(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("divergence", list(train_draft.Divergence))
def test_distillation_loss_matches_the_divergence_of_forward_logits(toy, divergence):
    params = toy.params
    exit_layer = max(params.config.num_layers - 2, 0)
    head = ee.init_exit_head(params, exit_layer)
    tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, 200)
    lengths = jnp.asarray([5, 3], jnp.int32)
    # A perturbed adapter, so that the folded head differs from the tied one.
    h = params.config.hidden_size
    kernel = jnp.eye(h) + 0.1 * jax.random.normal(jax.random.key(1), (h, h))
    head = head.replace(adapter={"kernel": kernel})
    states = ee.layer_hidden_states(params, tokens, lengths, (exit_layer,))
    # Given weights 2 and 1 on three positions (row 0 columns 1 and 4, row 1 column 2),
    # padded with a zero-weight entry,
    weights = np.zeros((2, 5), np.float32)
    weights[0, 1], weights[0, 4], weights[1, 2] = 2.0, 1.0, 1.0
    columns, values = train_draft._loss_columns(weights)
    assert list(columns[:3]) == [1, 4, 7] and values[3:].sum() == 0

    loss = train_draft.distillation_loss(
        head,
        params,
        states.exits[0],
        lengths,
        jnp.asarray(columns),
        states.final.reshape(10, h)[columns],
        jnp.asarray(values),
        divergence,
    )

    log_p = _log_softmax64(forward(params, tokens, lengths))
    log_q = _log_softmax64(forward(ee.build_draft(params, head), tokens, lengths))
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    tv = 0.5 * np.sum(np.abs(np.exp(log_p) - np.exp(log_q)), axis=-1)
    per_position = {"kl": kl, "tv": tv, "kl+tv": kl + tv}[divergence.value]
    expected = np.sum(per_position * weights) / np.sum(weights)
    assert float(loss) == pytest.approx(expected, rel=KL_RTOL)
    assert expected > 0


def test_a_draft_equal_to_the_model_has_zero_loss_and_full_acceptance(toy):
    # Given an exit block that copies the last layer (the draft is the full model),
    params = toy.params
    head = ee.init_exit_head(params, params.config.num_layers - 1)
    rows = [np.array([1, 5, 9, 2, 7], np.int32), np.array([3, 4, 6], np.int32)]
    sequences = train_draft.Sequences(tokens=rows, prompt_lengths=[2, 1])
    features = train_draft.compute_features(
        params, sequences, [params.config.num_layers - 1], progress=False
    )[params.config.num_layers - 1]
    # then the acceptance is one on every reply token.
    got = train_draft.measure_acceptance(params, head, sequences, features)
    assert got.tokens == 3 + 2 and got.sequences == 2
    assert got.mean == pytest.approx(1.0, abs=EXACT_ATOL)


def test_least_squares_adapter_recovers_a_planted_map(toy):
    # Given teacher states that are exactly a linear map of the draft's normed block output,
    params = toy.params
    h = params.config.hidden_size
    exit_layer = max(params.config.num_layers - 2, 0)
    head = ee.init_exit_head(params, exit_layer)
    rows = [
        np.asarray(jax.random.randint(jax.random.key(i), (n,), 0, 200), np.int32)
        for i, n in enumerate([40, 33, 57, 21, 64])
    ]
    sequences = train_draft.Sequences(tokens=rows, prompt_lengths=[3] * len(rows))
    hidden = train_draft.compute_features(params, sequences, [exit_layer], progress=False)[
        exit_layer
    ].hidden
    planted = np.asarray(jax.random.normal(jax.random.key(9), (h, h)) / np.sqrt(h))
    final = [
        np.asarray(ee.exit_hidden(params, head, x[None], jnp.asarray([len(x)]))[0]) @ planted
        for x in hidden
    ]
    features = train_draft.Features(hidden=hidden, final=final)
    # when the adapter is fitted without a ridge, it is that map;
    fitted = train_draft.least_squares_adapter(params, head, sequences, features, ridge=0.0)
    np.testing.assert_allclose(fitted.adapter["kernel"], planted, atol=RECOVERY_ATOL)
    # and a ridge shrinks it.
    shrunk = train_draft.least_squares_adapter(params, head, sequences, features, ridge=1.0)
    assert np.linalg.norm(shrunk.adapter["kernel"]) < np.linalg.norm(planted)
    # The rest of the head is unchanged.
    for a, b in zip(jax.tree.leaves(fitted.layer), jax.tree.leaves(head.layer), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_config_names_the_field(prompts_file):
    with pytest.raises(ValueError, match="temperature"):
        train_draft.Config(prompts=prompts_file, temperature=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        train_draft.Config(prompts=prompts_file, batch_size=0)
    with pytest.raises(ValueError, match="prompts"):
        train_draft.Config(prompts="/no/such/file.jsonl")
    with pytest.raises(ValueError, match="ridge"):
        train_draft.Config(prompts=prompts_file, ridge=-1.0)
    with pytest.raises(ValueError, match="adapter_init"):
        train_draft.Config(prompts=prompts_file, adapter_init="least-squares")


def test_cli_reports_a_bad_exit_layer_in_one_line(prompts_file, tmp_path, toy, capsys):
    argv = ["train-draft", "--model", TOY, "--prompts", prompts_file, "--exit-layer", "99",
            "--output", str(tmp_path / "head.safetensors"), "--quiet"]  # fmt: skip
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("uhlm train-draft: error:") and "exit_layer=99" in err


def test_cli_smoke_run_writes_the_head_and_its_json(prompts_file, tmp_path, toy, capsys):
    parser = argparse.ArgumentParser()
    train_draft.add_arguments(parser)
    exit_layer = max(toy.params.config.num_layers - 2, 0)
    args = parser.parse_args(
        [
            "--model", TOY, "--prompts", prompts_file, "--exit-layer", str(exit_layer),
            "--samples-per-prompt", "1", "--max-new-tokens", "4", "--epochs", "1",
            "--batch-size", "2", "--workdir", str(tmp_path / "w"),
            "--output", str(tmp_path / "out" / "head.safetensors"), "--json", "--quiet",
        ]
    )  # fmt: skip

    assert train_draft.main(args) == 0

    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 2  # 4 training prompts, batches of 2, one epoch
    assert 0.0 <= result["acceptance_trained"]["mean"] <= 1.0
    head, _ = ee.load_exit_head(tmp_path / "out" / "head.safetensors", toy.params.config)
    assert head.exit_layer == exit_layer
    with open(tmp_path / "out" / "head.json") as f:
        sidecar = json.load(f)
    assert sidecar["acceptance"] == result["acceptance_trained"]["mean"]
    assert sidecar["storage_dtype"] == "float16"
    assert set(sidecar["link_by_split"]) == {"calibration", "evaluation"}
    assert sidecar["link"]["tokens"] == result["acceptance_trained"]["tokens"]


def test_interrupted_run_resumes_to_the_same_head(prompts_file, tmp_path, toy, capsys):
    # Given one uninterrupted run of 4 steps,
    whole = train_draft.run(_config(prompts_file, tmp_path / "a", toy), progress=False)
    # and one stopped after a step,
    first = train_draft.run(_config(prompts_file, tmp_path / "b", toy, max_steps=1), progress=False)
    assert first.steps == 1
    initial, _ = ee.load_exit_head(first.output, toy.params.config)
    checkpoints = train_draft.checkpoint_dir(_config(prompts_file, tmp_path / "b", toy))
    assert os.listdir(checkpoints)
    # a rerun without --resume stops with a one-line error that names the fix,
    cfg = _config(prompts_file, tmp_path / "b", toy)
    argv = ["train-draft", "--model", TOY, "--prompts", prompts_file,
            "--exit-layer", str(cfg.exit_layer), "--samples-per-prompt", "1",
            "--max-new-tokens", "6", "--epochs", "2", "--batch-size", "2",
            "--warmup-steps", "1", "--checkpoint-every", "1", "--workdir", cfg.workdir,
            "--output", cfg.output, "--quiet"]  # fmt: skip
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "stopped at step 1" in err and "--resume" in err and len(err.splitlines()) == 1
    # and `uhlm train-draft --resume` continues it,
    assert cli_main([*argv, "--resume", "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    # then both reach the same head (optimizer state and data order were restored),
    assert whole.steps == resumed["steps"] == 4
    # and the training time counts both sessions.
    with open(os.path.join(checkpoints, "train_seconds.json")) as f:
        seconds = {int(step): value for step, value in json.load(f).items()}
    assert sorted(seconds) == [1, 2, 3, 4]
    assert all(seconds[k] <= seconds[k + 1] for k in (1, 2, 3))
    assert resumed["train_s"] >= seconds[4]
    a, _ = ee.load_exit_head(whole.output, toy.params.config)
    b, _ = ee.load_exit_head(resumed["output"], toy.params.config)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    changed = [
        not np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(initial), jax.tree.leaves(a), strict=True)
    ]
    assert any(changed)


def test_resume_without_checkpoints_is_refused(prompts_file, tmp_path, toy):
    with pytest.raises(ValueError, match="drop --resume"):
        train_draft.run(_config(prompts_file, tmp_path, toy, resume=True), progress=False)


def test_weighted_line_matches_least_squares_on_repeated_rows():
    # Integer weights are repeated rows: the weighted line is numpy's unweighted fit of
    # the expanded data.
    rng = np.random.default_rng(0)
    u, beta = rng.random(30), rng.random(30)
    counts = rng.integers(0, 4, size=(3, 30))
    slope, intercept, r = train_draft._weighted_line(u, beta, counts.astype(np.float64))
    for k in range(3):
        x, y = np.repeat(u, counts[k]), np.repeat(beta, counts[k])
        expected_slope, expected_intercept = np.polyfit(x, y, 1)
        assert slope[k] == pytest.approx(expected_slope, rel=1e-9)
        assert intercept[k] == pytest.approx(expected_intercept, rel=1e-9)
        assert r[k] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-9)


# Seeds of the draft draws averaged in the link test.
LINK_SEEDS = 16
# Two-sided test at about the 0.01% level.
LINK_Z = 4.0


def test_link_samples_rejection_averages_to_the_total_variation(toy):
    # Given a perturbed draft of the toy model and random sequences,
    params = toy.params
    exit_layer = params.config.num_layers - 2
    head = ee.init_exit_head(params, exit_layer)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 200, size=n).astype(np.int32) for n in (40, 33, 50, 27)]
    sequences = train_draft.Sequences(tokens=rows, prompt_lengths=[5, 4, 6, 3])
    features = train_draft.compute_features(params, sequences, [exit_layer], progress=False)
    features = features[exit_layer]
    acceptance = train_draft.measure_acceptance(params, head, sequences, features)
    # when tokens are drafted from q and rejected with probability β = max(0, 1 − p/q),
    means = []
    for seed in range(LINK_SEEDS):
        u, beta, owner = train_draft.link_samples(params, head, sequences, features, seed)
        assert len(u) == acceptance.tokens and sorted(set(owner)) == [0, 1, 2, 3]
        # (u is a share of K = 20 re-draws, stored exactly)
        np.testing.assert_array_equal(u, exact_fractions(20)[np.rint(u * 20).astype(int)])
        means.append(beta.mean())
    # then E[β] = TV(p, q), one minus the acceptance, within the draws' standard error.
    se = np.std(means, ddof=1) / np.sqrt(LINK_SEEDS)
    assert abs(1.0 - np.mean(means) - acceptance.mean) <= LINK_Z * se
    # and the summary's numbers are those of its samples.
    link = train_draft.measure_link(params, head, sequences, features, seed=0)
    u, beta, _ = train_draft.link_samples(params, head, sequences, features, 0)
    assert link.r == pytest.approx(np.corrcoef(u, beta)[0, 1], rel=1e-6)
    assert link.intercept_interval[0] <= link.intercept <= link.intercept_interval[1]
    assert link.risk_averse_skip == pytest.approx(np.mean(u <= link.risk_averse))


def test_a_draft_equal_to_the_model_is_never_rejected(toy):
    params = toy.params
    head = ee.init_exit_head(params, params.config.num_layers - 1)
    rows = [np.array([1, 5, 9, 2, 7, 3, 3], np.int32), np.array([3, 4, 6, 8], np.int32)]
    sequences = train_draft.Sequences(tokens=rows, prompt_lengths=[2, 1])
    features = train_draft.compute_features(
        params, sequences, [params.config.num_layers - 1], progress=False
    )[params.config.num_layers - 1]
    link = train_draft.measure_link(params, head, sequences, features)
    # β = 0 everywhere: zero risk, so the risk-bounded threshold skips every token.
    assert link.intercept == pytest.approx(0.0, abs=EXACT_ATOL)
    assert link.risk_bounded == 1.0 and link.risk_bounded_skip == 1.0


def test_heldout_replies_do_not_depend_on_the_training_data_size(prompts_file, tmp_path, toy):
    cfg = _config(prompts_file, tmp_path, toy)
    more = _config(prompts_file, tmp_path, toy, samples_per_prompt=8, max_train_prompts=2)
    assert train_draft.heldout_settings(cfg) == train_draft.heldout_settings(more)
    longer = _config(prompts_file, tmp_path, toy, max_new_tokens=7)
    assert train_draft.heldout_settings(cfg) != train_draft.heldout_settings(longer)
