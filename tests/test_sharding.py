"""Meshes: parsing and checks, the head-aligned block layout, and split LLMs that match one
device (on 4 emulated CPU devices, in a subprocess: the device count is fixed when JAX
starts)."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhlm_jax.models.llama import forward, init_params, params_to_hf
from uhlm_jax.models.toy import TOY_LLM_CONFIG
from uhlm_jax.modes import Mode
from uhlm_jax.pair import ModelPair, load_pair
from uhlm_jax.rollout import Records, RolloutConfig, RolloutParams, run_rollout
from uhlm_jax.sharding import (
    MeshShape,
    check_model_split,
    make_mesh,
    place_pair,
    reblock,
    split_model,
)

REPO = Path(__file__).resolve().parents[1]
# Split products sum their partial results in another order: logits agree to this
# fraction of their largest magnitude.
LOGIT_RTOL = 1e-5
# Record floats are probabilities and uncertainties in [0, 1] (log-probabilities of a
# few nats): a few float32 ulps apart.
RECORD_ATOL = 1e-5
EMULATED_DEVICES = 4
# The meshes compared with one device, as (name, data, model).
MESHES = (("data=2,model=2", 2, 2), ("model=4", 1, 4))
PROMPTS = ("alpha bravo", "charlie 7", "delta echo foxtrot", "golf")
EXACT_RECORDS = ("token", "draft", "transmitted", "accepted", "resampled", "valid", "uplink_k")


# Given: a mesh written by a user.
@pytest.mark.parametrize(
    "text, shape",
    [
        ("data=2,model=2", MeshShape(2, 2)),
        ("model=4", MeshShape(None, 4)),
        (" data = 8 ", MeshShape(8, 1)),
    ],
)
def test_mesh_text_is_read_into_a_shape(text, shape):
    assert MeshShape.parse(text) == shape


@pytest.mark.parametrize(
    "text, named",
    [
        ("data=2,modle=2", "'modle=2'"),
        ("data=2,data=2", "'data=2'"),
        ("model=two", "model='two'"),
        ("model=0", "model=0"),
        ("", "''"),
    ],
)
def test_unreadable_mesh_is_a_one_line_error_naming_the_item(text, named):
    with pytest.raises(ValueError, match="mesh") as err:
        MeshShape.parse(text)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_mesh_that_does_not_use_the_devices_is_a_one_line_error():
    assert MeshShape(None, 2).resolve(8) == MeshShape(4, 2)
    with pytest.raises(ValueError, match=r"model=3 does not divide the 4 devices"):
        MeshShape(None, 3).resolve(4)
    with pytest.raises(ValueError, match=r"data=3,model=1 uses 3 devices but 4 are visible"):
        MeshShape(3, 1).resolve(4)
    with pytest.raises(ValueError, match=r"data=2,model=2 uses 4 devices but 1 are visible"):
        make_mesh(MeshShape(2, 2), jax.devices()[:1])


def test_model_axis_that_does_not_divide_the_heads_is_a_one_line_error():
    # The toy LLM has 2 kv heads and 128 MLP columns.
    check_model_split(TOY_LLM_CONFIG, 2)
    with pytest.raises(ValueError, match=r"model=4 does not divide the LLM's 2 key/value heads"):
        check_model_split(TOY_LLM_CONFIG, 4)
    wide_mlp = dataclasses.replace(TOY_LLM_CONFIG, intermediate_size=129)
    with pytest.raises(ValueError, match=r"model=2 does not divide the LLM's 129 MLP columns"):
        check_model_split(wide_mlp, 2)


def test_blocks_hold_whole_kv_groups_and_mlp_halves():
    # Given: the toy LLM (4 query heads, 2 kv heads of 16 dims; 128 MLP columns).
    llm = load_pair("toy").llm
    layer = llm.weights["layers_0"]
    # When: its fused kernels are held as 2 blocks.
    blocked = reblock(llm, 2)
    # Then: each block is [q_j | k_j | v_j] and [gate_j | up_j] with half of each part.
    qkv = np.asarray(layer["self_attn"]["qkv_proj"]["kernel"])
    q, k, v = qkv[:, :64], qkv[:, 64:96], qkv[:, 96:]
    expected = np.concatenate(
        [q[:, :32], k[:, :16], v[:, :16], q[:, 32:], k[:, 16:], v[:, 16:]], axis=1
    )
    got = blocked.weights["layers_0"]["self_attn"]["qkv_proj"]["kernel"]
    np.testing.assert_array_equal(got, expected)
    gate_up = np.asarray(layer["mlp"]["gate_up_proj"]["kernel"])
    gate, up = gate_up[:, :128], gate_up[:, 128:]
    expected = np.concatenate([gate[:, :64], up[:, :64], gate[:, 64:], up[:, 64:]], axis=1)
    got = blocked.weights["layers_0"]["mlp"]["gate_up_proj"]["kernel"]
    np.testing.assert_array_equal(got, expected)
    # And the model, its HF tensors and its logits are unchanged.
    back = reblock(blocked, 1).weights["layers_0"]["self_attn"]["qkv_proj"]["kernel"]
    np.testing.assert_array_equal(back, qkv)
    for name, tensor in params_to_hf(llm).items():
        np.testing.assert_array_equal(params_to_hf(blocked)[name], tensor, err_msg=name)
    tokens = jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8]], jnp.int32)
    lengths = jnp.asarray([4, 3], jnp.int32)
    np.testing.assert_allclose(
        forward(blocked, tokens, lengths), forward(llm, tokens, lengths), rtol=1e-6, atol=1e-6
    )


def _wide_pair() -> ModelPair:
    """The toy SLM with an LLM whose 4 kv heads (and query-head bias) a model axis of 4
    can split; weights scaled like the toy's so the distributions are peaked."""
    toy = load_pair("toy")
    config = dataclasses.replace(
        TOY_LLM_CONFIG, num_heads=8, num_kv_heads=4, head_dim=8, num_layers=2, qkv_bias=True
    )
    weights = init_params(config, jax.random.key(1)).weights
    for i in range(config.num_layers):
        qkv = weights[f"layers_{i}"]["self_attn"]["qkv_proj"]
        qkv["bias"] = 0.1 * jax.random.normal(jax.random.key(2 + i), qkv["bias"].shape)
    weights["embed_tokens"]["embedding"] = weights["embed_tokens"]["embedding"] * 10
    weights["lm_head"]["kernel"] = weights["lm_head"]["kernel"] * 18
    llm = dataclasses.replace(toy.llm, config=config, weights=weights)
    return dataclasses.replace(toy, name="wide", llm=llm)


def _outputs(pair: ModelPair, devices: list, data: int, model: int) -> dict[str, np.ndarray]:
    """Logits of whole prompts and the records of a U-HLM rollout on one mesh."""
    mesh = make_mesh(MeshShape(data, model), devices)
    placed = place_pair(pair, mesh)
    tokens = np.zeros((len(PROMPTS), 8), np.int32)  # right-padded bytes
    lengths = np.zeros(len(PROMPTS), np.int32)
    for row, prompt in enumerate(PROMPTS):
        ids = list(prompt.encode())[:8]
        tokens[row, : len(ids)], lengths[row] = ids, len(ids)
    logits = jax.jit(forward)(placed.llm, tokens, lengths)
    output = run_rollout(
        placed,
        list(PROMPTS),
        RolloutConfig(mode=Mode.UHLM, max_new_tokens=6),
        RolloutParams.create(threshold=0.35),
        seed=3,
        mesh=mesh,
    )
    return {"logits": np.asarray(logits), **output.records._asdict()}


def _child(out: str) -> None:
    """Runs in a process with 4 emulated devices: one device, then every mesh."""
    assert jax.device_count() == EMULATED_DEVICES, jax.devices()
    pair = _wide_pair()
    results = {"one": _outputs(pair, jax.devices()[:1], 1, 1)}
    for name, data, model in MESHES:
        results[name] = _outputs(pair, jax.devices(), data, model)
    # The split weights really are split: each device holds a quarter of a kernel.
    llm = split_model(pair.llm, make_mesh(MeshShape(1, 4)))
    kernel = llm.weights["layers_0"]["mlp"]["down_proj"]["kernel"]
    assert {s.data.shape for s in kernel.addressable_shards} == {(32, 64)}
    flat = {f"{mesh}/{k}": v for mesh, fields in results.items() for k, v in fields.items()}
    np.savez(out, **flat)


@pytest.mark.slow
def test_split_llm_gives_the_tokens_decisions_and_logits_of_one_device(tmp_path):
    # Given: 4 emulated devices in a fresh process.
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={EMULATED_DEVICES}"
    env["JAX_PLATFORMS"] = "cpu"
    out = tmp_path / "outputs.npz"
    # When: the same prompts run on one device and on each mesh.
    subprocess.run(
        [sys.executable, "-m", "tests.test_sharding", str(out)],
        check=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )
    results = np.load(out)
    one = {k.split("/")[1]: results[k] for k in results if k.startswith("one/")}
    # The comparison can fail: U-HLM both sent and skipped tokens, and some were rejected.
    sent = one["transmitted"][one["valid"]]
    assert sent.any() and not sent.all()
    assert (one["resampled"][one["valid"]]).any()
    # Then: tokens and decisions are identical, logits and floats agree to rounding.
    for name, _, _ in MESHES:
        got = {k.split("/")[1]: results[k] for k in results if k.startswith(f"{name}/")}
        scale = np.abs(one["logits"]).max()
        np.testing.assert_allclose(got["logits"], one["logits"], rtol=0, atol=LOGIT_RTOL * scale)
        for field in Records._fields:
            if field in EXACT_RECORDS:
                np.testing.assert_array_equal(got[field], one[field], err_msg=f"{name} {field}")
            else:
                np.testing.assert_allclose(
                    got[field], one[field], rtol=0, atol=RECORD_ATOL, err_msg=f"{name} {field}"
                )


if __name__ == "__main__":
    _child(sys.argv[1])
