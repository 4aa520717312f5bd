"""Early-exit drafts: construction, exactness against `llama.forward`, files, FLOPs.

Fast tests use a tiny random decoder; the committed SmolLM2 exit head is checked in the
slow tests.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhlm_jax.models import early_exit as ee
from uhlm_jax.models.config import SMOLLM2_135M, Architecture, ModelConfig
from uhlm_jax.models.llama import forward, init_params, output_logits

# float32 logits of two computations of the same network in a different operation order.
LOGIT_ATOL = 1e-5
# Relative rounding of float16 (10 explicit mantissa bits, round to nearest).
FLOAT16_RTOL = 2.0**-11
# An adapter recovered from its folded head by float32 least squares.
ADAPTER_ATOL = 1e-4

TINY = ModelConfig(
    architecture=Architecture.LLAMA,
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=10_000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    qkv_bias=False,
)



@pytest.fixture(scope="module")
def params():
    return init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
    tokens = jax.random.randint(jax.random.key(1), (3, 7), 0, TINY.vocab_size)
    lengths = jnp.asarray([7, 4, 1], jnp.int32)
    real = np.arange(7)[None, :] < np.asarray(lengths)[:, None]
    return tokens, lengths, real


def _trained_like(head: ee.ExitHead, key) -> ee.ExitHead:
    """The head with every tensor perturbed, standing in for a trained one."""
    leaves, tree = jax.tree.flatten(head)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        w + 0.05 * jax.random.normal(k, w.shape, w.dtype) for w, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, noisy)


def test_draft_has_l_plus_one_layers_and_shares_the_first_l(params):
    head = _trained_like(ee.init_exit_head(params, 2), jax.random.key(2))

    draft = ee.build_draft(params, head)

    assert draft.config.num_layers == 3
    for i in range(2):
        for a, b in zip(
            jax.tree.leaves(draft.weights[f"layers_{i}"]),
            jax.tree.leaves(params.weights[f"layers_{i}"]),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        draft.weights["embed_tokens"]["embedding"], params.weights["embed_tokens"]["embedding"]
    )
    back = ee.exit_head_from_draft(draft, params)
    assert back.exit_layer == 2
    for a, b in zip(
        jax.tree.leaves((back.layer, back.norm)), jax.tree.leaves((head.layer, head.norm)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(
        back.adapter["kernel"], head.adapter["kernel"], atol=ADAPTER_ATOL
    )


def test_the_adapter_is_folded_into_an_untied_head(params):
    # Given an identity adapter, the folded head is the embedding's transpose, exactly;
    head = ee.init_exit_head(params, 1)
    draft = ee.build_draft(params, head)
    assert not draft.config.tie_word_embeddings
    np.testing.assert_array_equal(
        draft.weights["lm_head"]["kernel"], params.weights["embed_tokens"]["embedding"].T
    )
    # a general adapter A gives A @ E^T (checked in float64).
    kernel = jax.random.normal(jax.random.key(7), (TINY.hidden_size,) * 2)
    draft = ee.build_draft(params, head.replace(adapter={"kernel": kernel}))
    expected = np.asarray(kernel, np.float64) @ np.asarray(
        params.weights["embed_tokens"]["embedding"], np.float64
    ).T
    np.testing.assert_allclose(draft.weights["lm_head"]["kernel"], expected, atol=LOGIT_ATOL)


def test_untrained_head_at_the_last_layer_is_the_full_model(params, batch):
    # Given the exit block copied from the last layer and the final norm,
    tokens, lengths, real = batch
    head = ee.init_exit_head(params, TINY.num_layers - 1)
    # when the draft keeps all other layers, it is the full model (its untied head is the
    # embedding's transpose, applied by another matrix product).
    draft = ee.build_draft(params, head)
    np.testing.assert_allclose(
        np.asarray(forward(draft, tokens, lengths))[real],
        np.asarray(forward(params, tokens, lengths))[real],
        atol=LOGIT_ATOL,
    )


def test_hidden_states_reproduce_the_full_models_logits(params, batch):
    tokens, lengths, real = batch
    states = ee.layer_hidden_states(params, tokens, lengths, (1, 3))
    expected = forward(params, tokens, lengths)
    got = output_logits(params, states.final)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expected)[real], atol=LOGIT_ATOL)
    assert states.exits.shape == (2, 3, 7, TINY.hidden_size)


@pytest.mark.parametrize("exit_layer", [0, 1, 2])
def test_exit_logits_match_the_draft_decoder(params, batch, exit_layer):
    # Given a perturbed head on top of stored layer-L states,
    tokens, lengths, real = batch
    head = _trained_like(ee.init_exit_head(params, exit_layer, source_layer=3), jax.random.key(3))
    states = ee.layer_hidden_states(params, tokens, lengths, (exit_layer,))
    # when run alone, it gives the logits of the whole draft decoder.
    got = ee.exit_logits(params, head, states.exits[0], lengths)
    expected = forward(ee.build_draft(params, head), tokens, lengths)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expected)[real], atol=LOGIT_ATOL)


def test_init_copies_and_leaves_the_model_unchanged(params):
    head = ee.init_exit_head(params, 1, source_layer=2)
    source = params.weights["layers_2"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(head.layer["mlp"]["down_proj"]["kernel"], source)
    assert head.layer["mlp"]["down_proj"]["kernel"] is not source


@pytest.mark.without_type_checks
@pytest.mark.parametrize("bad", [-1, 4, True, 1.0])
def test_bad_exit_layer_is_rejected(params, bad):
    with pytest.raises(ValueError, match="exit_layer"):
        ee.init_exit_head(params, bad)


def test_build_rejects_a_head_of_another_model(params):
    other = init_params(
        ModelConfig(**{**TINY.__dict__, "intermediate_size": 40}), jax.random.key(4)
    )
    with pytest.raises(ValueError, match="does not match the model"):
        ee.build_draft(params, ee.init_exit_head(other, 1))


def test_save_load_round_trip_float32_is_exact(params, tmp_path):
    head = _trained_like(ee.init_exit_head(params, 2), jax.random.key(5))
    path = tmp_path / "head.safetensors"

    ee.save_exit_head(path, head, TINY, dtype=np.float32, metadata={"note": "x"})
    loaded, meta = ee.load_exit_head(path, TINY)

    assert loaded.exit_layer == 2 and meta["note"] == "x"
    # Files hold separate projections whatever the decoder's layout; the draft is the same.
    assert set(loaded.layer["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    lengths = jnp.asarray([6, 3], jnp.int32)
    np.testing.assert_array_equal(
        forward(ee.build_draft(params, loaded), tokens, lengths),
        forward(ee.build_draft(params, head), tokens, lengths),
    )


def test_save_float16_rounds_within_half_an_ulp(params, tmp_path):
    head = _trained_like(ee.init_exit_head(params, 2), jax.random.key(6))
    path = tmp_path / "head.safetensors"
    ee.save_exit_head(path, head, TINY)
    loaded, _ = ee.load_exit_head(path, TINY)
    draft_a = ee.build_draft(params, loaded).weights["layers_2"]
    draft_b = ee.build_draft(params, head).weights["layers_2"]
    for a, b in zip(jax.tree.leaves(draft_a), jax.tree.leaves(draft_b), strict=True):
        np.testing.assert_allclose(a, b, rtol=FLOAT16_RTOL, atol=2.0**-24)
    size = os.path.getsize(path)
    params_count = sum(x.size for x in jax.tree.leaves(head))
    assert size < 2 * params_count + 4096  # two bytes per parameter plus the header


def test_load_rejects_missing_and_mismatched_files(params, tmp_path):
    with pytest.raises(FileNotFoundError, match="train-draft"):
        ee.load_exit_head(tmp_path / "none.safetensors", TINY)
    path = tmp_path / "head.safetensors"
    ee.save_exit_head(path, ee.init_exit_head(params, 1), TINY)
    with pytest.raises(ValueError, match="does not match the model"):
        ee.load_exit_head(path, SMOLLM2_135M)
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError):
        ee.load_exit_head(tmp_path / "junk.safetensors", TINY)


def test_load_names_the_format_of_an_older_file(params, tmp_path):
    # Given a file of the first format (an exit block and a norm, no adapter),
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = tmp_path / "old.safetensors"
    ee.save_exit_head(path, ee.init_exit_head(params, 1), TINY)
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    del tensors["adapter/kernel"]
    save_file(tensors, str(path), metadata={**meta, "format": "uhlm_jax.early_exit/1"})
    # then loading it says which format it is and how to replace it.
    with pytest.raises(ValueError, match=r"early_exit/1.*train-draft"):
        ee.load_exit_head(path, TINY)


def test_load_rejects_an_adapter_of_the_wrong_shape(params, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = tmp_path / "head.safetensors"
    ee.save_exit_head(path, ee.init_exit_head(params, 1), TINY)
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    tensors["adapter/kernel"] = tensors["adapter/kernel"][:, :-1].copy()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="adapter"):
        ee.load_exit_head(path, TINY)


def test_flops_fraction_by_hand():
    # TINY: per layer q 32*32 + k, v 2*32*16 + o 32*32 + MLP 3*32*48 = 7680 multiply-adds;
    # tied head 64*32 = 2048. Draft with L = 1 runs 2 layers: (2*7680 + 2048) / (4*7680 + 2048).
    assert ee.draft_flops_fraction(TINY, 1) == pytest.approx(17408 / 32768, rel=1e-12)
    assert ee.draft_flops_fraction(TINY, 3) == pytest.approx(1.0)
    # SmolLM2-135M: 3,538,944 per layer, head 28,311,552; L = 9 keeps 10 of 30 layers.
    assert ee.draft_flops_fraction(SMOLLM2_135M, 9) == pytest.approx(
        (10 * 3538944 + 28311552) / (30 * 3538944 + 28311552), rel=1e-12
    )
    assert ee.draft_flops_fraction(SMOLLM2_135M, 9) < 0.5
    # L = 10 keeps 11 layers: 11 * 3538944 + 28311552 = 67239936, half of 134479872.
    assert ee.draft_flops_fraction(SMOLLM2_135M, 10) == pytest.approx(0.5, rel=1e-12)
    assert ee.draft_flops_fraction(SMOLLM2_135M, 11) > 0.5


# ---------------------------------------------------------------------------------------
# The committed SmolLM2 exit head.


def _embedded_sidecar() -> dict:
    with open(
        os.path.join(os.path.dirname(ee.__file__), "..", "data", "smollm2_exit_head.json")
    ) as f:
        return json.load(f)


def test_committed_head_is_small_float16_and_described():
    meta = _embedded_sidecar()
    path = ee.embedded_exit_head_path()
    assert os.path.getsize(path) < 8 * 2**20
    assert meta["storage_dtype"] == "float16"
    assert 0 <= meta["exit_layer"] < SMOLLM2_135M.num_layers
    assert meta["flops_fraction"] == pytest.approx(
        ee.draft_flops_fraction(SMOLLM2_135M, meta["exit_layer"])
    )


@pytest.mark.slow
def test_embedded_draft_shares_the_first_layers_bit_exactly():
    from uhlm_jax.models.registry import load_model

    full = load_model("smollm2-135m-instruct").params
    draft = load_model("smollm2-exit-draft").params
    exit_layer = _embedded_sidecar()["exit_layer"]
    assert draft.config.num_layers == exit_layer + 1
    for i in range(exit_layer):
        for a, b in zip(
            jax.tree.leaves(draft.weights[f"layers_{i}"]),
            jax.tree.leaves(full.weights[f"layers_{i}"]),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)


# Two-sided test of each stated estimate (acceptance, r, intercept) at about the 0.3% level.
ACCEPTANCE_Z = 3.0
EVALUATION_PROMPTS = 12


@pytest.mark.slow
def test_committed_head_reproduces_the_stated_acceptance_and_link():
    # Given the acceptance, r(u, β) and intercept on the evaluation prompts stated next to
    # the committed head,
    from calibration import train_draft
    from calibration.prompts import embedded_prompts_path, read_prompts
    from uhlm_jax.models.registry import load_model

    meta = _embedded_sidecar()
    stated = meta["acceptance_by_split"]["evaluation"]
    settings = meta["train_config"]
    model = load_model("smollm2-135m-instruct")
    head, _ = ee.load_exit_head(ee.embedded_exit_head_path(), model.params.config)
    # when it is measured again on newly sampled replies to those prompts (other keys),
    # A third of the evaluation prompts keeps the test to a few minutes on 2 cores; the
    # tolerance grows with the standard error accordingly.
    prompts = read_prompts(embedded_prompts_path(), "evaluation")
    prompts = [p.text for p in prompts[:EVALUATION_PROMPTS]]
    replies = train_draft.sample_sequences(
        model.params,
        model.tokenizer,
        prompts,
        1,
        settings["max_new_tokens"],
        settings["temperature"],
        settings["seed"] + 2,
        progress=False,
    )
    features = train_draft.compute_features(model.params, replies, [head.exit_layer], False)
    features = features[head.exit_layer]
    got = train_draft.measure_acceptance(model.params, head, replies, features)
    link = train_draft.measure_link(model.params, head, replies, features, settings["seed"])
    # then the estimates agree within their standard errors.
    tolerance = ACCEPTANCE_Z * math.hypot(got.se, stated["se"])
    assert abs(got.mean - stated["mean"]) <= tolerance, (got, stated)
    stated_link = meta["link_by_split"]["evaluation"]
    for name in ("r", "intercept"):
        se = math.hypot(getattr(link, f"{name}_se"), stated_link[f"{name}_se"])
        tolerance = ACCEPTANCE_Z * se
        assert abs(getattr(link, name) - stated_link[name]) <= tolerance, (name, link, stated_link)
