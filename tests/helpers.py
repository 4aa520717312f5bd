"""Helpers shared by the tests: closed-form fakes and synthetic calibration runs.

Sections:
  * Distribution pairs: named `(p, q)` pairs of log-probabilities on a small vocabulary,
    including adversarial ones, for speculative verification.
  * Logits: closed-form logits and a float64 NumPy oracle for tempered/top-k distributions.
  * Record tables: synthetic calibration records whose u → β model is known.
  * Run directories: record tables written as a calibration run, and a real toy-pair run.
  * Tiny checkpoints: a tiny Llama config, random Hugging Face-layout weights, and GGUF
    files and `config.json` written from them.
  * Split-file parts: fake data-only wheel parts of a split file.
  * u → β data with known parameters: linear and hurdle draws for parameter recovery.
  * Collection in a subprocess: prompt files, the `uhlm collect` command, its environment.

The distribution pairs and logits are deterministic NumPy (no RNG, no files), so tests
can use them as an independent oracle for the JAX code.
"""

import hashlib
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import pandas as pd

from calibration import collect, records
from calibration import run_dir as rd
from calibration.prompts import embedded_prompts_path
from uhlm_jax.models.config import Architecture, ModelConfig
from uhlm_jax.models.split_file import SplitFile
from uhlm_jax.models.tokenizer import TOY_SPECIAL_TOKENS, TokenType, _gpt2_byte_alphabet

# ---------------------------------------------------------------------------------------
# Distribution pairs
# ---------------------------------------------------------------------------------------


class DistributionPair(NamedTuple):
    """A verifier distribution `p` and a draft distribution `q` on the same vocabulary.

    Attributes:
      name: identifier, used as a pytest id.
      log_p: float32 `[v]` verifier log-probabilities (`-inf` where `p_v = 0`).
      log_q: float32 `[v]` draft log-probabilities (`-inf` where `q_v = 0`).
    """

    name: str
    log_p: np.ndarray
    log_q: np.ndarray

    @property
    def p(self) -> np.ndarray:
        """float64 `[v]` probabilities `exp(log_p)`."""
        return np.exp(self.log_p.astype(np.float64))

    @property
    def q(self) -> np.ndarray:
        """float64 `[v]` probabilities `exp(log_q)`."""
        return np.exp(self.log_q.astype(np.float64))

    @property
    def total_variation(self) -> float:
        """`Σ_v max(0, q_v − p_v)` in float64 from the float32 log-probabilities."""
        return float(np.sum(np.maximum(0.0, self.q - self.p)))


def _log_normalised(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    weights = np.asarray(weights, np.float64)
    with np.errstate(divide="ignore"):
        return np.log(weights / weights.sum()).astype(np.float32)


def distribution_pair(
    name: str, p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray
) -> DistributionPair:
    """Builds a pair from non-negative weights (normalised here, in float64).

    Args:
      name: identifier.
      p: `[v]` non-negative verifier weights, not all zero.
      q: `[v]` non-negative draft weights, not all zero.

    Returns:
      The `DistributionPair`.

    Raises:
      ValueError: on negative weights, all-zero weights or mismatched lengths.
    """
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"{name}: p{p.shape} and q{q.shape} must be 1-d of equal length.")
    for label, weights in (("p", p), ("q", q)):
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"{name}: {label}={weights} must be >= 0 and not all zero.")
    return DistributionPair(name, _log_normalised(p), _log_normalised(q))


def distribution_pairs() -> tuple[DistributionPair, ...]:
    """The named pairs on 8 tokens, generic and adversarial.

    * `equal`: `p = q`; TV = 0, every draft accepted.
    * `partial_overlap`: generic, TV ≈ 0.45.
    * `disjoint_supports`: no common support; TV = 1, every draft rejected.
    * `one_hot_q`: the draft is certain; accepted with probability `p_2`.
    * `one_hot_p`: the verifier is certain; the output is always token 5.
    * `near_zero_q_draft`: `q_3 = 1e-6` but `p_3 = 0.3`: rare drafts, always accepted,
      and most of `p_3` comes through the residual.
    * `near_zero_p`: `p_0 = 1e-7` with `q_0 = 0.5`: β(0) ≈ 1.
    * `zero_cells`: zeros in `p` where `q > 0` and in `q` where `p > 0`.
    * `nearly_equal`: `p` and `q` differ by about one float32 ulp, so rejections are
      rare and the residual is mostly rounding.
    """
    generic_p = [0.30, 0.20, 0.10, 0.10, 0.10, 0.10, 0.05, 0.05]
    generic_q = [0.05, 0.05, 0.10, 0.10, 0.20, 0.20, 0.10, 0.20]
    base = np.array([0.21, 0.17, 0.15, 0.13, 0.11, 0.09, 0.08, 0.06])
    nearly = base * (1.0 + 2e-7 * np.array([1, -1, 2, -2, 1, -1, 3, -3]))
    return (
        distribution_pair("equal", generic_p, generic_p),
        distribution_pair("partial_overlap", generic_p, generic_q),
        distribution_pair(
            "disjoint_supports", [0, 0, 0, 0, 0.4, 0.3, 0.2, 0.1], [0.5, 0.3, 0.2, 0, 0, 0, 0, 0]
        ),
        distribution_pair("one_hot_q", generic_p, [0, 0, 1, 0, 0, 0, 0, 0]),
        distribution_pair("one_hot_p", [0, 0, 0, 0, 0, 1, 0, 0], generic_q),
        distribution_pair(
            "near_zero_q_draft",
            [0.1, 0.1, 0.1, 0.3, 0.1, 0.1, 0.1, 0.1],
            [0.2, 0.2, 0.2, 1e-6, 0.1, 0.1, 0.1, 0.1],
        ),
        distribution_pair(
            "near_zero_p",
            [1e-7, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1],
            [0.5, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05],
        ),
        distribution_pair(
            "zero_cells",
            [0.0, 0.3, 0.3, 0.0, 0.2, 0.2, 0.0, 0.0],
            [0.25, 0.25, 0.0, 0.25, 0.0, 0.25, 0.0, 0.0],
        ),
        distribution_pair("nearly_equal", nearly, base),
    )


# ---------------------------------------------------------------------------------------
# Logits
# ---------------------------------------------------------------------------------------


def example_logits(vocab: int, phase: float = 0.0) -> np.ndarray:
    """Deterministic, tie-free float32 logits `z_v = 3 sin(1.7 v + phase) − 0.05 v`.

    Args:
      vocab: number of entries.
      phase: shifts the pattern, so two calls give two different models.

    Returns:
      float32 `[vocab]`.
    """
    v = np.arange(vocab, dtype=np.float64)
    return (3.0 * np.sin(1.7 * v + phase) - 0.05 * v).astype(np.float32)


def tempered_log_probs(
    logits: np.ndarray, temperature: float, top_k: int | None = None
) -> np.ndarray:
    """float64 oracle for `speculative.draft_log_probs` (same top-k tie rule).

    `log softmax(mask_k(z / τ))`, keeping exactly the `top_k` largest entries, ties broken
    towards the lower index.

    Args:
      logits: `[v]` logits.
      temperature: `τ > 0`.
      top_k: entries kept, or None for all.

    Returns:
      float64 `[v]` log-probabilities, `-inf` outside the top-k.
    """
    scaled = np.asarray(logits, np.float64) / temperature
    if top_k is not None:
        kept = np.argsort(-scaled, kind="stable")[:top_k]
        masked = np.full_like(scaled, -np.inf)
        masked[kept] = scaled[kept]
        scaled = masked
    shifted = scaled - np.max(scaled)
    return shifted - np.log(np.sum(np.exp(shifted)))


# ---------------------------------------------------------------------------------------
# Record tables
# ---------------------------------------------------------------------------------------

# Temperature perturbation with K draws takes the values k/K.
NUM_PERTURBATIONS = 20


def hurdle_beta(
    rng: np.random.Generator,
    u: np.ndarray,
    positive_slope: float,
    positive_intercept: float,
    mean_slope: float,
    mean_intercept: float,
    concentration: float,
) -> np.ndarray:
    """β from the hurdle model: Bernoulli(σ(c·u + e)) times Beta with mean σ(f·u + g)."""
    p = 1 / (1 + np.exp(-(positive_slope * u + positive_intercept)))
    m = 1 / (1 + np.exp(-(mean_slope * u + mean_intercept)))
    positive = rng.uniform(size=u.shape) < p
    value = rng.beta(m * concentration, (1 - m) * concentration)
    return np.where(positive, np.clip(value, 1e-6, 1.0), 0.0)


def synthetic_records(
    rng: np.random.Generator,
    num_prompts: int,
    tokens_per_prompt: int,
    hurdle_params: tuple[float, float, float, float, float] = (4.0, -2.0, 2.0, -1.5, 8.0),
) -> pd.DataFrame:
    """A record table whose β follows the hurdle model in u = k/K, k ~ Binomial(K, ·).

    Each prompt has its own typical uncertainty (a Beta(1, 3) draw) so prompts
    differ, as real prompts do.
    """
    n = num_prompts * tokens_per_prompt
    prompt_level = rng.beta(1.0, 3.0, num_prompts)
    prompt_id = np.repeat(np.arange(num_prompts, dtype=np.int64) * 3 + 7, tokens_per_prompt)
    k = rng.binomial(NUM_PERTURBATIONS, np.repeat(prompt_level, tokens_per_prompt))
    u = k / NUM_PERTURBATIONS
    beta = hurdle_beta(rng, u, *hurdle_params)
    return pd.DataFrame(
        {
            "prompt_id": prompt_id,
            "position": np.tile(np.arange(tokens_per_prompt, dtype=np.int32), num_prompts),
            "token": rng.integers(0, 100, n).astype(np.int32),
            "draft": rng.integers(0, 100, n).astype(np.int32),
            "beta": beta.astype(np.float32),
            "tv": np.clip(beta + 0.05, 0, 1).astype(np.float32),
            "accepted": rng.uniform(size=n) >= beta,
            "u_temperature_perturbation": u.astype(np.float32),
            "u_entropy": (3.0 * u + rng.uniform(0, 0.1, n)).astype(np.float32),
        }
    )


# ---------------------------------------------------------------------------------------
# Run directories
# ---------------------------------------------------------------------------------------


def write_run(run_dir, df: pd.DataFrame, num_shards: int = 2) -> None:
    """Writes a run directory: `config.json` and `num_shards` shuffled record shards."""
    rd.write_json(run_dir / rd.CONFIG_FILE, {"synthetic": True})
    order = np.random.default_rng(0).permutation(len(df))
    for i, part in enumerate(np.array_split(order, num_shards)):
        records.write_shard(df.iloc[part], run_dir / rd.RECORDS_DIR / f"shard-{i:05d}.parquet")


def write_synthetic_run(run_dir, prompts=12, tokens=20, seed=0):
    """A run directory whose records follow a linear u → β model (β ≈ 0.8 u − 0.06)."""
    rng = np.random.default_rng(seed)
    n = prompts * tokens
    u = rng.binomial(20, rng.beta(1, 3, n)) / 20
    beta = np.clip(0.8 * u - 0.06 + rng.normal(0, 0.1, n), 0, 1)
    df = pd.DataFrame(
        {
            "prompt_id": np.repeat(np.arange(prompts), tokens),
            "position": np.tile(np.arange(tokens), prompts),
            "token": rng.integers(0, 50, n),
            "draft": rng.integers(0, 50, n),
            "beta": beta,
            "tv": beta,
            "accepted": rng.random(n) > beta,
            "u_temperature_perturbation": u,
            "u_entropy": np.clip(u + rng.normal(0, 0.2, n), 0, None),
        }
    )
    records.write_shard(df, run_dir / rd.RECORDS_DIR / "shard-000000.parquet")
    rd.write_json(run_dir / rd.CONFIG_FILE, {"settings": {"pair": "toy", "seed": 0}})
    return records.read_records(run_dir)


def collect_toy_run(run_dir, max_new_tokens, seed=0):
    """A real calibration run of the toy pair: 8 shipped prompts in one batch."""
    collect.run(
        collect.Config(
            pair="toy",
            prompts=embedded_prompts_path(),
            out=str(run_dir),
            num_prompts=8,
            max_new_tokens=max_new_tokens,
            batch_size=8,
            seed=seed,
        )
    )
    return run_dir


# ---------------------------------------------------------------------------------------
# Tiny checkpoints
# ---------------------------------------------------------------------------------------

TINY_LLAMA = ModelConfig(
    architecture=Architecture.LLAMA,
    vocab_size=260,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=10_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    qkv_bias=False,
)

_HF_TO_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def random_hf_tensors(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors under HF names, shapes written out from the config."""
    rng = np.random.default_rng(seed)
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if config.qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
    return {
        name: rng.uniform(-1, 1, size=shape).astype(np.float32) for name, shape in shapes.items()
    }


def gguf_name_of(name: str) -> str:
    """llama.cpp's name of an HF tensor name, written out independently of `hf_name`."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in fixed:
        return fixed[name]
    _, _, layer, *module, kind = name.split(".")
    return f"blk.{layer}.{_HF_TO_GGUF_LAYER['.'.join(module)]}.{kind}"


def toy_vocab() -> tuple[list[str], list[int]]:
    """The 256 byte tokens plus the toy specials, and their GGUF token types."""
    tokens = [*_gpt2_byte_alphabet(), *TOY_SPECIAL_TOKENS]
    types = [TokenType.NORMAL] * 256 + [TokenType.CONTROL] * len(TOY_SPECIAL_TOKENS)
    return tokens, [int(t) for t in types]


def write_gguf(
    path: pathlib.Path,
    config: ModelConfig,
    tensors: dict[str, np.ndarray],
    *,
    tokens: list[str] | None = None,
    token_types: list[int] | None = None,
    merges: list[str] | None = None,
    pre: str = "gpt2",
    tokenizer_model: str = "gpt2",
    chat_template: str | None = None,
    q8_0: tuple[str, ...] = (),
) -> pathlib.Path:
    """Writes a GGUF file as llama.cpp's converter would, from HF-layout tensors.

    For the llama architecture q and k rows are permuted with llama.cpp's formula, written
    here directly (not via the module under test). Tensors named in `q8_0` are quantized.
    """
    if tokens is None:
        tokens, token_types = toy_vocab()
    arch = config.architecture.value
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges or [])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    writer.add_pad_token_id(258)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for name, array in tensors.items():
        if config.architecture is Architecture.LLAMA and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
            d = array.shape[0] // heads
            # convert_hf_to_gguf.py, LlamaModel.permute
            split = array.reshape(heads, 2, d // 2, *array.shape[1:])
            array = split.swapaxes(1, 2).reshape(array.shape)
        if name in q8_0:
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(
                gguf_name_of(name), quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
        else:
            writer.add_tensor(gguf_name_of(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_config_json(config: ModelConfig) -> dict:
    """The `config.json` of a LlamaForCausalLM checkpoint of `config`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
    }


# ---------------------------------------------------------------------------------------
# Split-file parts
# ---------------------------------------------------------------------------------------

FAKE_SPLIT_PREFIX = "uhlm-fake-split-part"
FAKE_SPLIT_VERSION = "1.2.3"
# Eleven parts, so that part 10 must follow part 9 (not part 1, as names would sort).
FAKE_PART_SIZES = (5, 1, 300, 7, 0, 64, 2, 3, 129, 11, 40)


def fake_parts(seed: int = 0) -> list[bytes]:
    """Random bytes of each part, sized `FAKE_PART_SIZES`."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in FAKE_PART_SIZES]


def split_of(parts: list[bytes]) -> SplitFile:
    """The `SplitFile` whose parts are `parts`."""
    return SplitFile(
        file_name="fake.gguf",
        prefix=FAKE_SPLIT_PREFIX,
        version=FAKE_SPLIT_VERSION,
        parts=len(parts),
        sha256=hashlib.sha256(b"".join(parts)).hexdigest(),
    )


def install_parts(root, parts: list[bytes], skip: tuple[int, ...] = ()) -> None:
    """Lays out part packages under `root`, leaving out the 1-based indices in `skip`."""
    for index, data in enumerate(parts, start=1):
        if index in skip:
            continue
        package = root / f"{FAKE_SPLIT_PREFIX.replace('-', '_')}{index}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{index:02d}.bin").write_bytes(data)


# ---------------------------------------------------------------------------------------
# u → β data with known parameters
# ---------------------------------------------------------------------------------------

TRUE_LINEAR = {"slope": 0.82, "intercept": -0.06, "sigma": 0.15}
TRUE_HURDLE = {
    "positive_slope": 4.0,
    "positive_intercept": -2.0,
    "mean_slope": 2.0,
    "mean_intercept": -1.5,
    "concentration": 8.0,
}


def linear_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u = rng.uniform(0, 1, n).astype(np.float32)
    beta = TRUE_LINEAR["slope"] * u + TRUE_LINEAR["intercept"]
    beta = (beta + TRUE_LINEAR["sigma"] * rng.standard_normal(n)).astype(np.float32)
    return u, beta


def hurdle_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u = (rng.integers(0, 21, n) / 20).astype(np.float32)
    return u, hurdle_beta(rng, u, *TRUE_HURDLE.values()).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Collection in a subprocess
# ---------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
# Float32 rounding differences between batch layouts (a few ulps of values in [0, 1]).
FLOAT_ATOL = 1e-5


def write_prompts(path: Path, count: int) -> Path:
    """Writes `count` short distinct prompts to the JSON Lines file `path`."""
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    lines = [
        json.dumps({"prompt": f"{words[i % 8]} {i} {words[(3 * i) % 8]}"}) for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def collect_command(prompts: Path, out: Path, *extra: str) -> list[str]:
    """`uhlm collect` of the toy pair on `prompts` into `out`, as a subprocess command."""
    return [
        sys.executable,
        "-m",
        "analysis.cli",
        "collect",
        "--pair",
        "toy",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--max-new-tokens",
        "8",
        "--batch-size",
        "4",
        "--seed",
        "3",
        *extra,
    ]


def cpu_env(devices: int = 1) -> dict:
    """This environment with JAX on `devices` host CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env
