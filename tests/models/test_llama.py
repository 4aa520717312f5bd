"""Tests of the decoder: cache consistency, batching, compilation, dtypes and errors.

Oracles: one full `forward` pass against prefill + incremental decode; each row run
alone against the padded batch; eager against jit; float32 against bfloat16; hand counts
of parameters and FLOPs. Agreement with Hugging Face transformers is in test_hf.py.
"""

from __future__ import annotations

import dataclasses

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhlm_jax.models import (
    Architecture,
    ModelConfig,
    Padding,
    init_cache,
    init_params,
    llama,
    params_from_hf,
    params_to_hf,
)
from uhlm_jax.models import decode as eager_decode
from uhlm_jax.models import forward as eager_forward
from uhlm_jax.models import prefill as eager_prefill

# Different computation paths (cache vs no cache, batch vs alone) agree to float32
# rounding: absolute error below this fraction of the largest |logit|.
PATH_RTOL = 1e-5
# bfloat16 keeps 8 significant bits (relative rounding 2^-9); errors compound over the
# layers, so bfloat16 logits are compared with float32 at this fraction of the scale.
BF16_RTOL = 0.05
# Weights of order one, so the logits are far from uniform and a bug shows.
WEIGHT_STD = 0.3

LLAMA_GQA = ModelConfig(
    architecture=Architecture.LLAMA,
    vocab_size=61,
    hidden_size=32,
    intermediate_size=40,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=10_000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    qkv_bias=False,
)
QWEN2_TIED = ModelConfig(
    architecture=Architecture.QWEN2,
    vocab_size=53,
    hidden_size=24,
    intermediate_size=32,
    num_layers=3,
    num_heads=6,
    num_kv_heads=2,
    head_dim=6,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    qkv_bias=True,
)
# Jitted at the test boundary, as callers do; one compilation per shape.
prefill = jax.jit(eager_prefill, static_argnames="padding")
decode = jax.jit(eager_decode)
forward = jax.jit(eager_forward, static_argnames="padding")

CONFIGS = [pytest.param(LLAMA_GQA, id="llama-gqa"), pytest.param(QWEN2_TIED, id="qwen2-tied")]


def random_params(config: ModelConfig, seed: int = 0, dtype=jnp.float32):
    """Weights ~ N(0, WEIGHT_STD²), biases included; norm scales ~ 1 + N(0, 0.1²)."""
    rng = np.random.default_rng(seed)
    template = params_to_hf(init_params(config, jax.random.key(0)))
    tensors = {
        name: (
            1.0 + 0.1 * rng.standard_normal(x.shape)
            if "norm" in name
            else WEIGHT_STD * rng.standard_normal(x.shape)
        ).astype(np.float32)
        for name, x in template.items()
    }
    return params_from_hf(config, tensors, dtype=dtype)


def padded_batch(prompts: list[np.ndarray], padding: Padding, pad_id: int = 0):
    """Stacks prompts into `[b, t]` with the given padding; returns tokens and lengths."""
    t = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        if padding is Padding.RIGHT:
            tokens[row, : len(prompt)] = prompt
        else:
            tokens[row, t - len(prompt) :] = prompt
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


def random_prompts(config: ModelConfig, lengths, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, config.vocab_size, n).astype(np.int32) for n in lengths]


def assert_close_to_scale(actual, expected, rtol):
    expected = np.asarray(expected)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=rtol * scale)


# ---------------------------------------------------------------------------------------
# Cache consistency.


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("padding", [Padding.RIGHT, Padding.LEFT])
def test_prefill_then_decode_equals_one_forward_pass(config, padding):
    # Given a padded batch of prompts and continuations of each.
    params = random_params(config)
    lengths = [7, 3, 1]
    steps = 4
    full = random_prompts(config, [n + steps for n in lengths])
    prompts = [seq[:n] for seq, n in zip(full, lengths, strict=True)]

    # When the prompts are prefilled and the continuations decoded one token at a time.
    tokens, lens = padded_batch(prompts, padding)
    cache = init_cache(config, len(prompts), max_length=16)
    logits, cache = prefill(params, tokens, lens, cache, padding=padding)
    step_logits = [logits]
    for j in range(steps - 1):
        step = jnp.asarray([seq[n + j] for seq, n in zip(full, lengths, strict=True)])
        logits, cache = decode(params, step, cache)
        step_logits.append(logits)

    # Then every step matches the full-sequence pass at the same position.
    whole, whole_lens = padded_batch(full, Padding.RIGHT)
    reference = forward(params, whole, whole_lens)
    for j, got in enumerate(step_logits):
        want = np.stack([reference[row, n - 1 + j] for row, n in enumerate(lengths)])
        assert_close_to_scale(got, want, PATH_RTOL)
    assert int(cache.index) == max(lengths) + steps - 1
    np.testing.assert_array_equal(cache.lengths, np.asarray(lengths) + steps - 1)


@pytest.mark.parametrize("config", CONFIGS)
def test_left_and_right_padded_forward_agree_on_real_tokens(config):
    params = random_params(config)
    prompts = random_prompts(config, [6, 2, 4])
    right = forward(params, *padded_batch(prompts, Padding.RIGHT), padding=Padding.RIGHT)
    left = forward(params, *padded_batch(prompts, Padding.LEFT), padding=Padding.LEFT)
    t = right.shape[1]
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        assert_close_to_scale(left[row, t - n :], right[row, :n], PATH_RTOL)


# ---------------------------------------------------------------------------------------
# Layer by layer: the residual stream and single layers.


def _separate_projections(layer: dict, config: ModelConfig) -> dict:
    """The layer with `q_proj, k_proj, v_proj` and `gate_proj, up_proj` split apart."""
    q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    attn, mlp = dict(layer["self_attn"]), dict(layer["mlp"])
    qkv = attn.pop("qkv_proj")
    for name, cut in zip(
        ("q_proj", "k_proj", "v_proj"),
        np.split(np.arange(q_width + 2 * kv_width), [q_width, q_width + kv_width]),
        strict=True,
    ):
        attn[name] = {leaf: value[..., cut] for leaf, value in qkv.items()}
    gate, up = jnp.split(mlp.pop("gate_up_proj")["kernel"], 2, axis=-1)
    mlp["gate_proj"], mlp["up_proj"] = {"kernel": gate}, {"kernel": up}
    return {**layer, "self_attn": attn, "mlp": mlp}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("padding", [Padding.RIGHT, Padding.LEFT])
def test_residual_stream_is_the_layers_run_one_by_one(config, padding):
    # Given a padded batch,
    params = random_params(config)
    prompts = random_prompts(config, [6, 2, 4])
    tokens, lengths = padded_batch(prompts, padding)
    t = tokens.shape[1]
    real = np.asarray(
        [
            np.arange(t) < n if padding is Padding.RIGHT else np.arange(t) >= t - n
            for n in map(len, prompts)
        ]
    )
    layers = tuple(range(config.num_layers))[::-1]
    # when the stream is kept at every layer (jitted, in reverse order),
    stream = jax.jit(llama.residual_stream, static_argnames=("layers", "padding"))
    inputs, final = stream(params, tokens, lengths, layers=layers, padding=padding)
    # then it equals the embedding run eagerly through `decoder_layer` one layer at a time,
    x = params.weights["embed_tokens"]["embedding"][tokens]
    for i in range(config.num_layers):
        assert_close_to_scale(inputs[layers.index(i)][real], x[real], PATH_RTOL)
        x = llama.decoder_layer(config, params.weights[f"layers_{i}"], x, lengths, padding)
    normed = llama.rms_norm(x, params.weights["norm"]["scale"], config.rms_norm_eps)
    assert_close_to_scale(final[real], normed[real], PATH_RTOL)
    # its final states are those of `final_hidden_states`,
    hidden = llama.final_hidden_states(params, tokens, lengths, padding)
    assert_close_to_scale(final[real], hidden[real], PATH_RTOL)
    # and the output head on them gives `forward`'s logits (head applied in float64).
    weights = params.weights
    head = (
        np.asarray(weights["embed_tokens"]["embedding"], np.float64).T
        if config.tie_word_embeddings
        else np.asarray(weights["lm_head"]["kernel"], np.float64)
    )
    logits = np.asarray(final, np.float64)[real] @ head
    assert_close_to_scale(logits, forward(params, tokens, lengths, padding)[real], PATH_RTOL)
    # and `output_logits`, the head alone, agrees with that float64 head.
    assert_close_to_scale(llama.output_logits(params, final)[real], logits, PATH_RTOL)


@pytest.mark.parametrize("config", CONFIGS)
def test_decoder_layer_reads_separate_projections_exactly_as_fused_ones(config):
    params = random_params(config)
    fused = params.weights["layers_1"]
    x = jax.random.normal(jax.random.key(2), (2, 5, config.hidden_size))
    lengths = jnp.asarray([5, 3], jnp.int32)
    separate = _separate_projections(fused, config)
    assert "qkv_proj" not in separate["self_attn"] and "gate_up_proj" not in separate["mlp"]
    np.testing.assert_array_equal(
        llama.decoder_layer(config, separate, x, lengths),
        llama.decoder_layer(config, fused, x, lengths),
    )


@pytest.mark.without_type_checks
@pytest.mark.parametrize("bad", [-1, 2, True, 1.0])
def test_residual_stream_names_a_bad_layer(bad):
    params = random_params(LLAMA_GQA)
    tokens = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"layer .* must be an int in \[0, 1\]"):
        llama.residual_stream(params, tokens, jnp.asarray([3]), (0, bad))


# ---------------------------------------------------------------------------------------
# Batching: a row's logits do not depend on the other rows.


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("padding", [Padding.RIGHT, Padding.LEFT])
def test_each_row_of_a_padded_batch_matches_running_it_alone(config, padding):
    params = random_params(config)
    lengths = [5, 1, 8]
    prompts = random_prompts(config, lengths)
    continuation = np.random.default_rng(7).integers(0, config.vocab_size, (3, len(prompts)))

    def run(batch_prompts, rows, max_length):
        tokens, lens = padded_batch(batch_prompts, padding)
        cache = init_cache(config, len(batch_prompts), max_length)
        logits, cache = prefill(params, tokens, lens, cache, padding=padding)
        out = [logits]
        for step in continuation:
            logits, cache = decode(params, jnp.asarray(step[rows]), cache)
            out.append(logits)
        return np.stack(out, axis=1)  # [b, steps + 1, v]

    batched = run(prompts, np.arange(len(prompts)), max_length=12)
    for row, prompt in enumerate(prompts):
        # Alone, unpadded, in a cache of another size.
        alone = run([prompt], np.asarray([row]), max_length=11)
        assert_close_to_scale(batched[row], alone[0], PATH_RTOL)


@pytest.mark.parametrize("padding", [Padding.RIGHT, Padding.LEFT])
def test_padding_ids_and_stale_cache_contents_have_exactly_zero_weight(padding):
    # Given the same prompts padded with two different ids, and caches whose unused slots
    # hold garbage.
    config = LLAMA_GQA
    params = random_params(config)
    prompts = random_prompts(config, [6, 2, 4])
    results = []
    for pad_id, fill in ((0, 0.0), (config.vocab_size - 1, 1e3)):
        tokens, lens = padded_batch(prompts, padding, pad_id=pad_id)
        cache = init_cache(config, len(prompts), 10)
        cache = jax.tree.map(lambda x, f=fill: x + f if x.dtype == jnp.float32 else x, cache)
        logits, cache = prefill(params, tokens, lens, cache, padding=padding)
        next_logits, _ = decode(params, jnp.asarray([1, 2, 3]), cache)
        results.append((np.asarray(logits), np.asarray(next_logits)))
    # Then the logits are bitwise identical: masked keys contribute exact zeros.
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


# ---------------------------------------------------------------------------------------
# jit: equal to eager, compiled once per shape.


def test_jit_matches_eager_and_decode_compiles_once_per_shape():
    config = LLAMA_GQA
    params = random_params(config)
    prompts = random_prompts(config, [4, 2])
    tokens, lens = padded_batch(prompts, Padding.RIGHT)

    chex.clear_trace_counter()
    traced_prefill = chex.assert_max_traces(eager_prefill, n=1)
    traced_decode = chex.assert_max_traces(eager_decode, n=1)
    jit_prefill = jax.jit(traced_prefill)
    jit_decode = jax.jit(traced_decode, donate_argnums=2)

    eager_logits, eager_cache = eager_prefill(params, tokens, lens, init_cache(config, 2, 12))
    logits, cache = jit_prefill(params, tokens, lens, init_cache(config, 2, 12))
    assert_close_to_scale(logits, eager_logits, PATH_RTOL)
    # New lengths are traced values: no retrace.
    jit_prefill(params, tokens, jnp.asarray([1, 3]), init_cache(config, 2, 12))

    for step in range(3):  # the write slot advances; shapes do not change
        next_tokens = jnp.asarray([step, step + 1])
        eager_logits, eager_cache = eager_decode(params, next_tokens, eager_cache)
        logits, cache = jit_decode(params, next_tokens, cache)
        assert_close_to_scale(logits, eager_logits, PATH_RTOL)
    assert int(cache.index) == 4 + 3


def test_decoding_past_the_end_of_the_cache_gives_nan_not_wrong_logits():
    config = LLAMA_GQA
    params = random_params(config)
    tokens, lens = padded_batch(random_prompts(config, [3]), Padding.RIGHT)
    logits, cache = prefill(params, tokens, lens, init_cache(config, 1, 4))
    logits, cache = decode(params, jnp.asarray([1]), cache)  # fills slot 3, the last
    assert np.isfinite(np.asarray(logits)).all()
    logits, cache = decode(params, jnp.asarray([2]), cache)
    assert np.isnan(np.asarray(logits)).all()


# ---------------------------------------------------------------------------------------
# bfloat16.


@pytest.mark.parametrize("config", CONFIGS)
def test_bfloat16_params_and_cache_run_and_stay_close_to_float32(config):
    params32 = random_params(config)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
    assert params16.dtype == jnp.bfloat16
    tokens, lens = padded_batch(random_prompts(config, [5, 3]), Padding.RIGHT)

    def run(params, cache_dtype):
        cache = init_cache(config, 2, 8, dtype=cache_dtype)
        first, cache = prefill(params, tokens, lens, cache)
        second, cache = decode(params, jnp.asarray([1, 2]), cache)
        assert cache.keys[0].dtype == cache_dtype
        return np.stack([first, second])

    want = run(params32, jnp.float32)
    got = run(params16, jnp.bfloat16)
    assert got.dtype == np.float32  # logits are always float32
    assert_close_to_scale(got, want, BF16_RTOL)
    # And the difference is real rounding, not a no-op cast.
    assert np.abs(got - want).max() > 0


# ---------------------------------------------------------------------------------------
# Parameters and config helpers.


@pytest.mark.parametrize("config", CONFIGS)
def test_hf_round_trip_is_exact_and_structure_matches_init(config):
    params = init_params(config, jax.random.key(3))
    again = params_from_hf(config, params_to_hf(params))
    assert jax.tree.structure(again) == jax.tree.structure(params)
    chex.assert_trees_all_equal(again.weights, params.weights)


def test_init_params_draws_independent_normal_matrices():
    params = init_params(LLAMA_GQA, jax.random.key(0))
    flat = flax.traverse_util.flatten_dict(params.weights)
    kernel = np.asarray(flat[("layers_0", "mlp", "gate_up_proj", "kernel")])
    # Sample std of n normals has standard error std / sqrt(2 n).
    se = 0.02 / np.sqrt(2 * kernel.size)
    assert abs(kernel.std() - 0.02) < 5 * se
    assert not np.array_equal(kernel, flat[("layers_1", "mlp", "gate_up_proj", "kernel")])
    np.testing.assert_array_equal(flat[("norm", "scale")], 1.0)


@pytest.mark.parametrize("config", CONFIGS)
def test_num_params_and_weight_bytes_count_the_actual_arrays(config):
    params = init_params(config, jax.random.key(0))
    sizes = {
        path: leaf.size for path, leaf in flax.traverse_util.flatten_dict(params.weights).items()
    }
    assert config.num_params == sum(sizes.values())
    table = config.vocab_size * config.hidden_size
    read = sum(sizes.values()) - (0 if config.tie_word_embeddings else table)
    assert config.weight_bytes() == 4 * read
    assert config.weight_bytes(2) == 2 * read


def test_flops_per_token_by_hand():
    c = LLAMA_GQA  # h 32, i 40, 2 layers, 4 heads, 2 kv heads, d 8, v 61, untied
    per_layer = 32 * (32 + 16 + 16) + 32 * 32 + 3 * 32 * 40
    matmuls = 2 * per_layer + 32 * 61  # head; the embedding is a lookup
    assert c.flops_per_token() == 2 * matmuls
    assert c.flops_per_token(10) == 2 * matmuls + 4 * 2 * 4 * 8 * 10
    tied = dataclasses.replace(c, tie_word_embeddings=True)
    assert tied.flops_per_token() == 2 * matmuls


# ---------------------------------------------------------------------------------------
# Errors.


def test_prompt_longer_than_cache_names_both_lengths_and_the_fix():
    params = random_params(LLAMA_GQA)
    tokens = jnp.zeros((2, 9), jnp.int32)
    with pytest.raises(ValueError, match=r"9 exceeds .* max_length 8.*max_length>=9"):
        eager_prefill(params, tokens, jnp.asarray([9, 4]), init_cache(LLAMA_GQA, 2, 8))


@pytest.mark.without_type_checks
def test_batch_and_rank_mismatches_are_rejected():
    params = random_params(LLAMA_GQA)
    cache = init_cache(LLAMA_GQA, 2, 8)
    with pytest.raises(ValueError, match="3 prompts but the cache has 2 rows"):
        prefill(params, jnp.zeros((3, 4), jnp.int32), jnp.asarray([4, 4, 4]), cache)
    with pytest.raises(ValueError, match="rank 1"):
        decode(params, jnp.zeros((2, 1), jnp.int32), cache)
    with pytest.raises(ValueError, match="3 tokens but the cache has 2 rows"):
        decode(params, jnp.zeros((3,), jnp.int32), cache)


@pytest.mark.without_type_checks
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(architecture="llama"), "architecture must be an Architecture"),
        (dict(num_heads=3), r"num_heads \(3\) must be a multiple of num_kv_heads \(2\)"),
        (dict(head_dim=7), "head_dim must be even"),
        (dict(hidden_size=0), "hidden_size must be a positive int, got 0"),
        (dict(vocab_size=2.5), "vocab_size must be a positive int, got 2.5"),
        (dict(rope_theta=-1.0), "rope_theta must be a positive number"),
        (dict(rms_norm_eps=float("inf")), "rms_norm_eps must be finite"),
        (dict(qkv_bias=1), "qkv_bias must be a bool"),
    ],
)
def test_invalid_config_values_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(LLAMA_GQA, **change)


@pytest.mark.without_type_checks
@pytest.mark.parametrize(("batch_size", "max_length"), [(0, 8), (2, 0), (2, 8.0), (True, 8)])
def test_init_cache_rejects_bad_sizes(batch_size, max_length):
    with pytest.raises(ValueError, match="must be a positive int"):
        init_cache(LLAMA_GQA, batch_size, max_length)


def test_params_from_hf_names_the_bad_tensor():
    tensors = params_to_hf(init_params(LLAMA_GQA, jax.random.key(0)))
    name = "model.layers.1.mlp.up_proj.weight"

    wrong_shape = dict(tensors, **{name: np.zeros((41, 32), np.float32)})
    with pytest.raises(ValueError, match=rf"{name} has shape \(41, 32\).*implies \(40, 32\)"):
        params_from_hf(LLAMA_GQA, wrong_shape)

    missing = {k: v for k, v in tensors.items() if k != name}
    with pytest.raises(ValueError, match=rf"Missing tensors.*{name}"):
        params_from_hf(LLAMA_GQA, missing)

    extra = dict(tensors, **{"model.layers.2.mlp.up_proj.weight": tensors[name]})
    with pytest.raises(ValueError, match=r"not part of a llama model with 2 layers"):
        params_from_hf(LLAMA_GQA, extra)

    # A tied checkpoint may carry lm_head.weight; rotary tables are ignored.
    tied = dataclasses.replace(LLAMA_GQA, tie_word_embeddings=True)
    tied_tensors = {k: v for k, v in tensors.items()}
    tied_tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    params = params_from_hf(tied, tied_tensors)
    assert "lm_head" not in params.weights
