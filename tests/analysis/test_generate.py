"""`uhlm generate`: sampling, the decode loop against a cache-free oracle, the CLI.

Fast tests use the toy model; the slow one asks SmolLM2-135M-Instruct for the capital of
France.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analysis import generate as job
from analysis.cli import main as cli_main
from uhlm_jax import cli_config
from uhlm_jax.models.llama import forward
from uhlm_jax.models.registry import load_model
from uhlm_jax.sampling import sample_token

# Monte Carlo draws for the frequency checks, and the tolerance in standard errors.
NUM_DRAWS = 20_000
SE_TOLERANCE = 5.0


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    return parser.parse_args(argv)


def _toy_cfg(**overrides) -> job.Config:
    return dataclasses.replace(
        job.Config(model="toy-llm", prompt="hello", max_new_tokens=6, chat=False), **overrides
    )


# ---------------------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("max_new_tokens", 0, "max_new_tokens must be a positive int"),
        ("temperature", -0.5, "temperature must be a finite number >= 0"),
        ("temperature", math.nan, "temperature must be a finite number >= 0"),
        ("top_k", -1, "top_k must be an int >= 0"),
        ("model", "", "model must be a non-empty name or path"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(job.Config(), **{field: value})


def test_cli_options_map_to_the_config():
    args = _parse(
        [
            "--model",
            "toy-slm",
            "--prompt",
            "x",
            "--max-new-tokens",
            "3",
            "--temperature",
            "0.7",
            "--top-k",
            "5",
            "--seed",
            "9",
            "--no-chat",
            "--json",
        ]
    )
    assert cli_config.config_from_args(job.Config, args) == job.Config(
        model="toy-slm",
        prompt="x",
        max_new_tokens=3,
        temperature=0.7,
        top_k=5,
        seed=9,
        chat=False,
    )
    assert cli_config.config_from_args(job.Config, _parse([])) == job.Config()


# ---------------------------------------------------------------------------------------
# uhlm_jax.sampling.sample_token, as generate uses it.


def _frequencies(logits, temperature, top_k, num_ids):
    keys = jax.random.split(jax.random.PRNGKey(0), NUM_DRAWS)
    draws = jax.jit(
        jax.vmap(sample_token, in_axes=(0, None, None, None, None)), static_argnums=(3, 4)
    )(keys, logits, jnp.float32(temperature), top_k, num_ids)
    return np.bincount(np.asarray(draws), minlength=logits.shape[0]) / NUM_DRAWS


def _assert_matches(freq, probs):
    se = np.sqrt(probs * (1 - probs) / NUM_DRAWS)
    assert np.all(np.abs(freq - probs) <= SE_TOLERANCE * se + 1e-12), (freq, probs)


def test_sample_token_follows_the_tempered_softmax():
    logits = jnp.array([1.0, 0.0, -1.0, 0.5, 2.0])
    temperature = 0.7
    probs = np.exp(np.asarray(logits) / temperature)
    _assert_matches(_frequencies(logits, temperature, 0, 5), probs / probs.sum())


def test_sample_token_top_k_and_vocabulary_limit():
    logits = jnp.array([1.0, 0.0, -1.0, 0.5, 9.0])
    # Id 4 is an embedding row the tokenizer lacks (num_ids=4): never sampled, even though
    # its logit is the largest; top-2 among the rest keeps ids 0 and 3.
    probs = np.array([math.exp(1.0), 0, 0, math.exp(0.5), 0])
    _assert_matches(_frequencies(logits, 1.0, 2, 4), probs / probs.sum())


def test_sample_token_temperature_zero_is_argmax():
    logits = jnp.array([0.1, 3.0, 2.9])
    freq = _frequencies(logits, 0.0, 0, 3)
    np.testing.assert_array_equal(freq, [0.0, 1.0, 0.0])


def test_changing_the_temperature_does_not_recompile():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def sample(logits, key, temperature):
        return sample_token(key, logits, temperature, 0, 3)

    logits, key = jnp.array([0.1, 3.0, 2.9]), jax.random.PRNGKey(1)
    for temperature in (0.0, 0.5, 1.0, 2.0):
        sample(logits, key, jnp.float32(temperature))


# ---------------------------------------------------------------------------------------
# The decode loop on the toy model.


def _greedy_oracle(model, prompt_ids, steps):
    """Greedy continuation recomputing the whole sequence without a cache each step."""
    ids = list(prompt_ids)
    width = len(ids) + steps  # one padded width, so `forward` compiles once
    score = jax.jit(forward)
    out = []
    for _ in range(steps):
        padded = ids + [model.tokenizer.pad_id] * (width - len(ids))
        logits = score(model.params, jnp.asarray([padded]), jnp.asarray([len(ids)]))
        logits = logits[0, len(ids) - 1, : model.tokenizer.vocab_size]
        token = int(jnp.argmax(logits))
        out.append(token)
        if token in model.tokenizer.stop_ids:
            break
        ids.append(token)
    return out


def test_greedy_generation_matches_the_cache_free_oracle():
    cfg = _toy_cfg()
    result = job.run(cfg)
    model = load_model("toy-llm")
    assert result.prompt_ids == tuple(model.tokenizer.encode("hello"))
    assert list(result.token_ids) == _greedy_oracle(model, result.prompt_ids, 6)
    assert result.text == model.tokenizer.decode(result.token_ids)


def test_sampling_is_reproducible_and_top_1_is_greedy():
    sampled = job.run(_toy_cfg(temperature=1.0, seed=3))
    assert job.run(_toy_cfg(temperature=1.0, seed=3)).token_ids == sampled.token_ids
    top_1 = job.run(_toy_cfg(temperature=1.5, top_k=1, seed=4))
    assert top_1.token_ids == job.run(_toy_cfg()).token_ids


def test_generation_stops_at_a_stop_token():
    # Given a tokenizer whose EOS is the toy model's first greedy token
    model = load_model("toy-llm")
    first = job.run(_toy_cfg()).token_ids[0]
    tokenizer = dataclasses.replace(model.tokenizer, eos_id=first, stop_ids=(first,))
    model = dataclasses.replace(model, tokenizer=tokenizer)
    # Then generation ends after that one token
    result = job.generate(_toy_cfg(), model)
    assert result.token_ids == (first,) and result.stopped


def test_chat_on_a_model_without_template_explains_the_fix():
    with pytest.raises(ValueError, match="--no-chat"):
        job.run(_toy_cfg(chat=True))


def test_main_prints_json(capsys):
    assert (
        job.main(
            _parse(
                [
                    "--model",
                    "toy-llm",
                    "--prompt",
                    "hi",
                    "--no-chat",
                    "--max-new-tokens",
                    "4",
                    "--json",
                ]
            )
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "toy-llm" and len(out["token_ids"]) <= 4
    assert out["prompt_ids"] == [256, ord("h"), ord("i")]
    assert out["tokens_per_s"] > 0


def test_main_streams_the_text(capsys):
    argv = ["--model", "toy-llm", "--prompt", "hi", "--no-chat", "--max-new-tokens", "5"]
    assert job.main(_parse(argv)) == 0
    captured = capsys.readouterr()
    expected = job.run(cli_config.config_from_args(job.Config, _parse(argv))).text
    assert captured.out == expected + "\n"
    assert "tok/s" in captured.err


def test_main_reports_bad_input_in_one_line(capsys):
    assert cli_main(["generate", "--model", "nope", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("uhlm generate: error: Unknown model 'nope'") and "Traceback" not in err
    assert cli_main(["generate", "--model", "toy-llm", "--prompt", "hi"]) == 2
    assert "--no-chat" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct.


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france():
    result = job.run(job.Config(prompt="What is the capital of France?", max_new_tokens=24))
    assert "Paris" in result.text
    assert result.stopped
