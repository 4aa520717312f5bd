"""uhlm_jax: uncertainty-aware hybrid language-model inference in JAX.

The library is pure functions and frozen dataclasses; jobs live in `calibration/` and
`analysis/`, and the `uhlm` command dispatches to them. Modules, by topic:

  models       Llama-family decoders, KV cache, GGUF / safetensors loaders, tokenizers;
               a BERT encoder for all-MiniLM-L6-v2 sentence embeddings
  modes        the five inference modes and each one's policy (what it drafts and sends)
  pair         an SLM/LLM pair over one vocabulary
  sampling     token sampling with the unused-id mask, row padding, reply generation
  speculative  exact verification of one draft position: accept, residual resample, β, TV
  uncertainty  uncertainty measures of the SLM (types)
  rollout      batched prefill + lax.scan decode of a pair in every mode, per-token records
  sharding     data x model device meshes: rows over data, the LLM split over model
  channel      payload, link, compute latency and throughput
  truncation   CU-HLM top-k uplink compression
  threshold    analytic thresholds and risk; posterior and distribution-free versions
  metrics      token sums and the metrics from them (TR, skip rate, acceptance, risk),
               throughput from records
  answers      whether a response gives a short reference answer, and the rate over prompts
  accuracy     per-prompt sentence similarity to the reference and answer correctness
  replay       trace replay of calibration records over a grid
  cli_config   a job's Config as command-line flags, with a TOML overlay (for the jobs)
  console      progress lines, strict JSON and undefined values, as the jobs print them
"""

from uhlm_jax.modes import Mode
from uhlm_jax.pair import ModelPair, known_pairs, load_pair
from uhlm_jax.rollout import (
    Records,
    RolloutConfig,
    RolloutOutput,
    RolloutParams,
    rollout,
    run_rollout,
    sweep,
)
from uhlm_jax.speculative import (
    Verification,
    draft_log_probs,
    rejection_probability,
    total_variation,
    verify,
)
from uhlm_jax.uncertainty import (
    DEFAULT_MEASURES,
    Entropy,
    ExpectedTemperaturePerturbation,
    OneMinusMaxProbability,
    TemperaturePerturbation,
    TopTwoMargin,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MEASURES",
    "Entropy",
    "ExpectedTemperaturePerturbation",
    "Mode",
    "ModelPair",
    "OneMinusMaxProbability",
    "Records",
    "RolloutConfig",
    "RolloutOutput",
    "RolloutParams",
    "TemperaturePerturbation",
    "TopTwoMargin",
    "Verification",
    "draft_log_probs",
    "known_pairs",
    "load_pair",
    "rejection_probability",
    "rollout",
    "run_rollout",
    "sweep",
    "total_variation",
    "verify",
]
