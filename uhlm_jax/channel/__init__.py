"""Wireless link, compute latency and token throughput of hybrid LM inference.

Everything a deployment costs per generated token, as pure functions of frozen
configs. Values one sweeps (SNR, bandwidth, bits per probability, top-k, skip rate)
are pytree leaves, so a grid over them is a ``vmap`` that compiles once; what changes
control flow (fading model, models, devices, vocabulary size) is static.

Model, term by term (DESIGN.md §2, "Link and latency model"), one module each:

* **Payload** (`payload`). Full distribution ``V · b`` bits; CU-HLM top-k truncation
  ``k · (b + ⌈log2 V⌉)`` bits (value and index of each kept entry); a token id
  ``⌈log2 V⌉`` bits; the downlink carries one token id per verified token.
* **Link** (`link`). Shannon rate ``W log2(1 + SNR·g)`` with the mean SNR from a link
  budget (transmit power, log-distance path loss, thermal noise × bandwidth × noise
  figure) and a Rayleigh block-fading power gain ``g ~ Exp(1)`` drawn per token and
  direction. Outage: a block whose rate would fall below ``η_min · W`` is not used; the
  transmitter waits ``retry_delay_s`` and tries again on a fresh block.
* **Compute** (`compute`). A roofline per model and device,
  ``max(FLOPs / peak, bytes / bandwidth)`` per decoded token, plus the cost of the
  temperature-perturbation uncertainty (``K`` samples over ``V``).
* **Per token** (`cost`), for each `Mode`: HLM costs
  ``τ_SLM + τ_unc + τ_UL + τ_LLM + τ_DL``; U-HLM pays the last three only on transmitted
  tokens. Under this model a skip rate ``s`` bounds U-HLM's speedup over HLM by
  ``1 / (1 − s)`` (`speedup_bound`).

Every public name of the submodules is re-exported here, so ``channel.X`` works for all.

References:
  S. Oh et al., "Uncertainty-Aware Hybrid Inference with On-Device Small and Remote
  Large Language Models", ICMLCN 2025, arXiv 2412.12687 (U-HLM).
  S. Oh et al., "Communication-Efficient Hybrid Language Model via Uncertainty-Aware
  Opportunistic and Compressed Transmission", arXiv 2505.11788 (CU-HLM).
  3GPP TR 38.901 v17 (path loss), TS 38.214 (CQI tables), TS 38.101-1 (UE power).
"""

from uhlm_jax.channel.compute import (
    KV_BYTES_PER_VALUE,
    UNCERTAINTY_BYTES_PER_ENTRY,
    UNCERTAINTY_FLOPS_PER_ENTRY,
    Deployment,
    Device,
    DeviceProfile,
    ModelProfile,
    ModelSize,
    PairProfile,
    Precision,
    compute_latency_s,
    decode_bytes,
    decode_flops,
    parameter_count,
    uncertainty_latency_s,
)
from uhlm_jax.channel.cost import (
    CostProfile,
    LatencyBreakdown,
    expected_breakdown,
    expected_speedup,
    expected_throughput_tokens_per_s,
    expected_token_latency_s,
    mode_latency_s,
    speedup_bound,
    token_latencies_s,
    uplink_bits,
)
from uhlm_jax.channel.link import (
    SNR_DB_RANGE,
    THERMAL_NOISE_DBM_PER_HZ,
    Fading,
    Link,
    LinkBudget,
    LinkPreset,
    db_to_linear,
    ergodic_rate_bits_per_s,
    exp1,
    exp1_scaled,
    expected_transmission_latency_s,
    link_from_budget,
    mean_snr_db,
    outage_probability,
    sample_transmission_latency_s,
    shannon_rate_bits_per_s,
)
from uhlm_jax.channel.payload import (
    downlink_bits,
    full_distribution_bits,
    token_id_bits,
    top_k_bits,
)

__all__ = [
    # payload
    "downlink_bits",
    "full_distribution_bits",
    "token_id_bits",
    "top_k_bits",
    # link
    "SNR_DB_RANGE",
    "THERMAL_NOISE_DBM_PER_HZ",
    "Fading",
    "Link",
    "LinkBudget",
    "LinkPreset",
    "db_to_linear",
    "ergodic_rate_bits_per_s",
    "exp1",
    "exp1_scaled",
    "expected_transmission_latency_s",
    "link_from_budget",
    "mean_snr_db",
    "outage_probability",
    "sample_transmission_latency_s",
    "shannon_rate_bits_per_s",
    # compute
    "KV_BYTES_PER_VALUE",
    "UNCERTAINTY_BYTES_PER_ENTRY",
    "UNCERTAINTY_FLOPS_PER_ENTRY",
    "Deployment",
    "Device",
    "DeviceProfile",
    "ModelProfile",
    "ModelSize",
    "PairProfile",
    "Precision",
    "compute_latency_s",
    "decode_bytes",
    "decode_flops",
    "parameter_count",
    "uncertainty_latency_s",
    # cost
    "CostProfile",
    "LatencyBreakdown",
    "expected_breakdown",
    "expected_speedup",
    "expected_throughput_tokens_per_s",
    "expected_token_latency_s",
    "mode_latency_s",
    "speedup_bound",
    "token_latencies_s",
    "uplink_bits",
]
