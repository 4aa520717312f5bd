"""Tests for the link, compute-latency and throughput model (uhlm_jax.channel)."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uhlm_jax import channel as ch
from uhlm_jax.metrics import link_metrics
from uhlm_jax.modes import Mode

# float32 arithmetic on a handful of operations.
FLOAT32_RTOL = 1e-5
# exp1 in float32: series cancellation near the switch costs a few ulps.
EXP1_RTOL = 2e-5
# Monte Carlo agreement: |mean − expected| within this many standard errors.
MC_STANDARD_ERRORS = 4.0
# Values quoted to four significant digits in hand-worked examples.
HAND_RTOL = 1e-4

TINYLLAMA_ON_PHONE = ch.Deployment(ch.ModelSize.TINYLLAMA_1_1B, ch.Device.PHONE_SOC)
LLAMA7B_ON_A100 = ch.Deployment(ch.ModelSize.LLAMA_2_7B, ch.Device.DATACENTER_GPU)


def _profile(link, **kwargs):
    kwargs.setdefault("bits_per_prob", 8.0)
    return ch.CostProfile(
        slm=TINYLLAMA_ON_PHONE, llm=LLAMA7B_ON_A100, link=link, vocab_size=32000, **kwargs
    )


def _static_link(snr_db=10.0, bandwidth_hz=10e6):
    return ch.Link(bandwidth_hz=bandwidth_hz, mean_snr_db=snr_db, fading=ch.Fading.NONE)


# ----------------------------------------------------------------------------- payload


def test_payload_hand_computed_for_llama_vocabulary():
    # Given V = 32000 (⌈log2 V⌉ = 15) and b = 8 bits per probability
    # Then the full distribution is 256000 bits and top-30 is 30 · (8 + 15) = 690 bits.
    assert ch.token_id_bits(32000) == 15
    assert float(ch.full_distribution_bits(32000, 8.0)) == 256000.0
    assert float(ch.top_k_bits(30, 32000, 8.0)) == 690.0
    assert ch.downlink_bits(32000) == 15


def test_token_id_bits_at_powers_of_two():
    assert ch.token_id_bits(2) == 1
    assert ch.token_id_bits(32768) == 15
    assert ch.token_id_bits(32769) == 16
    assert ch.token_id_bits(49152) == 16


def test_uplink_bits_follows_profile_top_k():
    link = _static_link()
    assert float(ch.uplink_bits(_profile(link))) == 256000.0
    assert float(ch.uplink_bits(_profile(link, top_k=30))) == 690.0


# -------------------------------------------------------------------------------- rate


def test_shannon_rate_at_10_db_and_10_mhz():
    rate = ch.shannon_rate_bits_per_s(10e6, 10.0)
    np.testing.assert_allclose(float(rate), 10e6 * math.log2(11.0), rtol=FLOAT32_RTOL)
    assert abs(float(rate) / 1e6 - 34.59) < 0.01


def _exp1_scaled_oracle(x: float) -> float:
    """e^x E1(x) = ∫_0^∞ exp(−x (e^s − 1)) ds (t = e^s), trapezoid in float64."""
    upper = math.log1p(60.0 / x)  # integrand below e^-60 beyond
    s = np.linspace(0.0, upper, 2_000_001)
    return float(np.trapezoid(np.exp(-x * np.expm1(s)), s))


@pytest.mark.parametrize("x", [1e-3, 0.1, 0.5, 0.999, 1.0, 1.001, 2.0, 5.0, 20.0, 100.0])
def test_exp1_scaled_matches_quadrature(x):
    np.testing.assert_allclose(
        float(ch.exp1_scaled(jnp.float32(x))), _exp1_scaled_oracle(x), rtol=EXP1_RTOL
    )


def test_exp1_known_value_and_no_overflow():
    np.testing.assert_allclose(float(ch.exp1(1.0)), 0.21938393439552027, rtol=EXP1_RTOL)
    # e^x E1(x) ~ 1/x (1 − 1/x + 2/x² ...) for large x; e^1000 would overflow float32.
    big = float(ch.exp1_scaled(1000.0))
    np.testing.assert_allclose(big, (1 - 1e-3 + 2e-6) / 1000.0, rtol=EXP1_RTOL)


@pytest.mark.parametrize("snr_db", [-10.0, 0.0, 10.0, 30.0])
def test_rayleigh_mean_rate_matches_closed_form(snr_db):
    # Given g ~ Exp(1), When averaging W log2(1 + SNR g) over draws,
    # Then the mean is W log2(e) e^{1/SNR} E1(1/SNR) within Monte Carlo error.
    n = 200_000
    gain = jax.random.exponential(jax.random.key(7), (n,))
    rate = ch.shannon_rate_bits_per_s(1e6, snr_db, gain)
    mean = float(jnp.mean(rate))
    standard_error = float(jnp.std(rate)) / math.sqrt(n)
    expected = float(ch.ergodic_rate_bits_per_s(1e6, snr_db))
    assert abs(mean - expected) < MC_STANDARD_ERRORS * standard_error


# -------------------------------------------------------------------------------- link


def test_mean_snr_of_good_preset_by_hand():
    # 23 dBm − (28 + 20 log10 3.5 + 22 log10 100) − (−174 + 10 log10 2e7 + 5)
    expected = 23.0 - (28.0 + 20 * math.log10(3.5) + 44.0) - (-174.0 + 10 * math.log10(2e7) + 5.0)
    assert abs(ch.mean_snr_db(ch.LinkPreset.GOOD.value) - expected) < 1e-9
    assert abs(expected - 36.108) < 1e-3


def test_presets_are_ordered_and_bandwidth_lowers_snr():
    snrs = [ch.mean_snr_db(p.value) for p in ch.LinkPreset]
    assert snrs[0] > snrs[1] > snrs[2]
    poor = ch.LinkPreset.POOR.value
    # Doubling the bandwidth doubles the noise power: −3.01 dB.
    drop = ch.mean_snr_db(poor) - ch.mean_snr_db(poor, 2 * poor.bandwidth_hz)
    assert abs(drop - 10 * math.log10(2)) < 1e-9
    link = ch.link_from_budget(ch.LinkPreset.POOR, snr_db=3.0, bandwidth_hz=5e6)
    assert (link.mean_snr_db, link.bandwidth_hz) == (3.0, 5e6)


@pytest.mark.parametrize("preset", list(ch.LinkPreset))
def test_outage_probability_matches_monte_carlo(preset):
    # Given a zero-bit payload, the latency is retry_delay · (outage blocks), so
    # P(latency > 0) is the outage probability.
    link = ch.link_from_budget(preset)
    n = 100_000
    keys = jax.random.split(jax.random.key(3), n)
    latency = jax.jit(jax.vmap(lambda k: ch.sample_transmission_latency_s(0.0, link, k)))(keys)
    share = float(jnp.mean(latency > 0))
    p_out = float(ch.outage_probability(link))
    standard_error = math.sqrt(max(p_out * (1 - p_out), 1e-12) / n)
    assert abs(share - p_out) < MC_STANDARD_ERRORS * standard_error + 1e-6


@pytest.mark.parametrize("preset", list(ch.LinkPreset))
def test_expected_transmission_latency_matches_monte_carlo(preset):
    link = ch.link_from_budget(preset)
    n = 200_000
    keys = jax.random.split(jax.random.key(11), n)
    sample = jax.vmap(lambda k: ch.sample_transmission_latency_s(256000.0, link, k))
    latency = jax.jit(sample)(keys)
    standard_error = float(jnp.std(latency)) / math.sqrt(n)
    expected = float(ch.expected_transmission_latency_s(256000.0, link))
    assert abs(float(jnp.mean(latency)) - expected) < MC_STANDARD_ERRORS * standard_error


def test_static_link_latency_is_bits_over_rate():
    link = ch.Link(bandwidth_hz=10e6, mean_snr_db=10.0, overhead_s=1e-3, fading=ch.Fading.NONE)
    expected = 256000.0 / (10e6 * math.log2(11.0)) + 1e-3
    np.testing.assert_allclose(
        float(ch.expected_transmission_latency_s(256000.0, link)), expected, rtol=FLOAT32_RTOL
    )
    sampled = ch.sample_transmission_latency_s(256000.0, link, jax.random.key(0))
    np.testing.assert_allclose(float(sampled), expected, rtol=FLOAT32_RTOL)
    assert float(ch.outage_probability(link)) == 0.0


# ----------------------------------------------------------------------------- compute


def test_parameter_counts_match_published_totals():
    # Totals of the released checkpoints (Hugging Face model cards / safetensors).
    assert ch.parameter_count(ch.ModelSize.TINYLLAMA_1_1B.value) == 1_100_048_384
    assert ch.parameter_count(ch.ModelSize.LLAMA_2_7B.value) == 6_738_415_616
    assert ch.parameter_count(ch.ModelSize.SMOLLM2_135M.value) == 134_515_008


# The size keys of each checkpoint's Hugging Face config.json.
TINYLLAMA_HF = {  # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "vocab_size": 32000, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
LLAMA_2_7B_HF = {  # meta-llama/Llama-2-7b-hf
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "vocab_size": 32000, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


@pytest.mark.parametrize(
    ("hf", "named"),
    [(TINYLLAMA_HF, ch.ModelSize.TINYLLAMA_1_1B), (LLAMA_2_7B_HF, ch.ModelSize.LLAMA_2_7B)],
)
def test_profile_from_a_published_config_is_the_named_profile(hf, named):
    from uhlm_jax.models.config import ModelConfig

    config = ModelConfig.from_hf_config(hf)
    profile = ch.ModelProfile.from_config(config, named.value.name)
    assert profile == named.value
    assert ch.parameter_count(profile) == ch.parameter_count(named.value) == config.num_params


def test_profile_from_the_smollm2_config_counts_134_5_million():
    from uhlm_jax.models.config import SMOLLM2_135M

    profile = ch.ModelProfile.from_config(SMOLLM2_135M, "smollm2-135m")
    assert profile == ch.ModelSize.SMOLLM2_135M.value
    assert ch.parameter_count(profile) == 134_515_008  # 134.5 M


def test_profile_of_a_tiny_config_counts_by_hand():
    from uhlm_jax.models.config import Architecture, ModelConfig

    # h 8, d_ff 12, 2 layers, 2 query heads and 1 KV head of 4, V 10, untied, q/k/v bias:
    # per layer q 8·8 + k 8·4 + v 8·4 + o 8·8 = 192, biases 8 + 4 + 4 = 16,
    # MLP 3·8·12 = 288, two norms 16: 512; two layers 1024 + embedding 80 + head 80 +
    # final norm 8 = 1192.
    config = ModelConfig(
        architecture=Architecture.QWEN2, vocab_size=10, hidden_size=8, intermediate_size=12,
        num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, rope_theta=1e4,
        rms_norm_eps=1e-6, tie_word_embeddings=False, qkv_bias=True,
    )
    profile = ch.ModelProfile.from_config(config, "tiny")
    assert ch.parameter_count(profile) == 1192 == config.num_params
    # A decode step multiplies the blocks' matrices and the head, not biases or lookups:
    # 2 · (2 · (192 + 288) + 80) FLOPs (attention adds 4·L·heads·d per cached token).
    assert ch.decode_flops(profile, 0) == 2 * (2 * (192 + 288) + 80) == config.flops_per_token()
    assert ch.decode_flops(profile, 3) == ch.decode_flops(profile, 0) + 4 * 2 * 2 * 4 * 3
    tied = ch.ModelProfile.from_config(dataclasses.replace(config, tie_word_embeddings=True), "t")
    assert ch.parameter_count(tied) == 1192 - 80


def test_profiles_of_loaded_models_count_their_arrays():
    from uhlm_jax.models import early_exit as ee
    from uhlm_jax.models.toy import toy_pair

    slm, llm = toy_pair()
    draft = ee.build_draft(llm, ee.init_exit_head(llm, 1))
    for params in (slm, llm, draft):
        profile = ch.ModelProfile.from_config(params.config, "m")
        assert ch.parameter_count(profile) == sum(x.size for x in jax.tree.leaves(params.weights))
    # The early-exit draft costs what it runs: one shared layer, the exit block and an
    # untied (adapter-folded) head.
    profile = ch.ModelProfile.from_config(draft.config, "draft")
    assert (profile.n_layers, profile.tied_embeddings) == (2, False)


@pytest.mark.slow
def test_profiles_of_the_embedded_pair_count_their_arrays():
    from uhlm_jax.pair import load_pair

    pair = load_pair("smollm2-exit")
    for params in (pair.slm, pair.llm):
        profile = ch.ModelProfile.from_config(params.config, "m")
        assert ch.parameter_count(profile) == sum(x.size for x in jax.tree.leaves(params.weights))
    assert ch.parameter_count(ch.ModelProfile.from_config(pair.llm.config, "m")) == 134_515_008
    draft = ch.ModelProfile.from_config(pair.slm.config, "draft")
    assert draft.n_layers < pair.llm.config.num_layers and not draft.tied_embeddings


def test_precision_of_a_dtype_is_its_bytes_per_parameter():
    assert ch.Precision.from_dtype(jnp.float32) is ch.Precision.FLOAT32
    assert ch.Precision.from_dtype(jnp.bfloat16) is ch.Precision.FLOAT16
    assert ch.Precision.from_dtype("float16") is ch.Precision.FLOAT16
    with pytest.raises(ValueError, match=r"int32.*float32, float16, bfloat16"):
        ch.Precision.from_dtype(jnp.int32)


def test_pair_profile_needs_one_vocabulary():
    slm = ch.ModelSize.SMOLLM2_135M.value
    with pytest.raises(ValueError, match=r"V = 49152.*V = 32000"):
        ch.PairProfile("mixed", slm, ch.ModelSize.LLAMA_2_7B.value, ch.Precision.FLOAT16)
    pair = ch.PairProfile("same", slm, slm, ch.Precision.FLOAT32)
    assert pair.vocab_size == 49152


def test_roofline_picks_the_binding_limit():
    model = ch.ModelSize.LLAMA_2_7B.value
    fast_memory = ch.DeviceProfile("fast-memory", peak_flops_per_s=1e9, memory_bytes_per_s=1e15)
    flops = ch.decode_flops(model, 512)
    compute_bound = ch.compute_latency_s(ch.Deployment(model, fast_memory))
    assert compute_bound == pytest.approx(flops / 1e9)
    memory_bound = ch.compute_latency_s(LLAMA7B_ON_A100)
    memory_bytes = ch.decode_bytes(model, ch.Precision.FLOAT16, 512)
    assert memory_bound == pytest.approx(memory_bytes / 2.039e12)


def test_worked_example_latency_and_throughput():
    # Given TinyLlama-1.1B (float16) on the phone profile, Llama-2-7B (float16) on the
    # A100 profile, a static 10 MHz link at 10 dB, V = 32000, b = 8, K = 20, context 512:
    # SLM: matmul params 22 · 44_040_192 + 32000 · 2048 = 1_034_420_224;
    #      bytes 2 · 1_034_420_224 + KV 2·22·512·4·64 values · 2 B = 2_080_374_784;
    #      at 76.8 GB/s: 27.088 ms (FLOPs 2.16e9 at 4 TFLOP/s: 0.54 ms, not binding).
    slm_s = 2_080_374_784 / 76.8e9
    # Uncertainty: 20 · 32000 logits · 4 B at 76.8 GB/s = 33.3 µs.
    unc_s = 20 * 32000 * 4 / 76.8e9
    # LLM: matmul params 32 · 202_375_168 + 32000 · 4096 = 6_607_077_376;
    #      bytes 2 · 6_607_077_376 + KV 2·32·512·32·128 · 2 B = 13_482_590_208;
    #      at 2.039 TB/s: 6.612 ms.
    llm_s = 13_482_590_208 / 2.039e12
    # Link: 10e6 · log2(11) = 34.594 Mbit/s; uplink 256000 bits = 7.400 ms; downlink
    # 15 bits = 0.43 µs.
    rate = 10e6 * math.log2(11.0)
    ul_s, dl_s = 256000 / rate, 15 / rate
    hlm_s = slm_s + unc_s + ul_s + llm_s + dl_s  # 41.134 ms, 24.31 tok/s
    uhlm_s = slm_s + unc_s + 0.54 * (ul_s + llm_s + dl_s)  # skip 46%: 34.688 ms
    assert hlm_s * 1e3 == pytest.approx(41.134, abs=1e-3)
    assert uhlm_s * 1e3 == pytest.approx(34.688, abs=1e-3)

    profile = _profile(_static_link())
    breakdown = ch.expected_breakdown(profile)
    for got, want in [
        (breakdown.slm_s, slm_s),
        (breakdown.uncertainty_s, unc_s),
        (breakdown.uplink_s, ul_s),
        (breakdown.llm_s, llm_s),
        (breakdown.downlink_s, dl_s),
    ]:
        np.testing.assert_allclose(float(got), want, rtol=FLOAT32_RTOL)
    want = {
        Mode.HLM: hlm_s,
        Mode.UHLM: uhlm_s,
        Mode.RAND_HLM: uhlm_s - unc_s,
        Mode.LLM_ONLY: llm_s + dl_s,
        Mode.SLM_ONLY: slm_s,
    }
    for mode, latency_s in want.items():
        got = float(ch.expected_token_latency_s(mode, profile, 0.46))
        np.testing.assert_allclose(got, latency_s, rtol=FLOAT32_RTOL, err_msg=str(mode))
    np.testing.assert_allclose(
        float(ch.expected_throughput_tokens_per_s(Mode.HLM, profile)), 1 / hlm_s, rtol=FLOAT32_RTOL
    )
    speedup = float(ch.expected_speedup(profile, 0.46))
    np.testing.assert_allclose(speedup, hlm_s / uhlm_s, rtol=FLOAT32_RTOL)
    assert speedup == pytest.approx(1.1858, rel=HAND_RTOL)
    assert float(ch.speedup_bound(0.46)) == pytest.approx(1 / 0.54)


def test_speedup_never_exceeds_bound_and_approaches_it_when_device_is_free():
    skip = jnp.linspace(0.0, 0.95, 20)
    profile = _profile(ch.link_from_budget(ch.LinkPreset.POOR))
    speedup = jax.jit(jax.vmap(lambda s: ch.expected_speedup(profile, s)))(skip)
    assert bool(jnp.all(speedup <= ch.speedup_bound(skip) * (1 + FLOAT32_RTOL)))
    # With SLM and uncertainty costs → 0 the bound is attained.
    free = ch.DeviceProfile("free", peak_flops_per_s=1e30, memory_bytes_per_s=1e30)
    free_slm = ch.Deployment(ch.ModelSize.TINYLLAMA_1_1B, free)
    profile = profile.replace(slm=free_slm)
    speedup = jax.jit(jax.vmap(lambda s: ch.expected_speedup(profile, s)))(skip)
    np.testing.assert_allclose(speedup, ch.speedup_bound(skip), rtol=1e-4)


# ------------------------------------------------------------------- batching and jit


def test_vmap_over_snr_and_bandwidth_equals_loop():
    profile = _profile(ch.link_from_budget(ch.LinkPreset.MEDIUM))
    snrs = jnp.array([-10.0, 0.0, 12.5, 40.0])
    widths = jnp.array([1e6, 5e6, 20e6, 100e6])

    def throughput(snr_db, bandwidth_hz, skip):
        link = profile.link.replace(mean_snr_db=snr_db, bandwidth_hz=bandwidth_hz)
        return ch.expected_throughput_tokens_per_s(Mode.UHLM, profile.replace(link=link), skip)

    batched = jax.vmap(throughput, in_axes=(0, 0, None))(snrs, widths, 0.3)
    looped = [float(throughput(float(s), float(w), 0.3)) for s, w in zip(snrs, widths, strict=True)]
    np.testing.assert_allclose(batched, looped, rtol=FLOAT32_RTOL)


def test_changing_snr_or_bandwidth_does_not_recompile():
    profile = _profile(ch.link_from_budget(ch.LinkPreset.GOOD))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def hlm_latency(snr_db, bandwidth_hz):
        link = profile.link.replace(mean_snr_db=snr_db, bandwidth_hz=bandwidth_hz)
        return ch.expected_token_latency_s(Mode.HLM, profile.replace(link=link))

    for snr_db, width in [(0.0, 1e6), (20.0, 10e6), (-5.0, 20e6)]:
        hlm_latency(jnp.float32(snr_db), jnp.float32(width))


def test_token_latencies_jit_equals_eager_and_loop():
    profile = _profile(ch.link_from_budget(ch.LinkPreset.POOR))
    n = 16
    transmitted = jax.random.bernoulli(jax.random.key(1), 0.5, (n,))
    valid = jnp.arange(n) < 12
    key = jax.random.key(5)
    eager = ch.token_latencies_s(Mode.UHLM, transmitted, valid, profile, key)
    jitted = jax.jit(ch.token_latencies_s, static_argnums=0)(
        Mode.UHLM, transmitted, valid, profile, key
    )
    np.testing.assert_allclose(eager, jitted, rtol=FLOAT32_RTOL)
    # Plain loop over steps with the documented key derivation.
    breakdown = ch.expected_breakdown(profile)
    sample = jax.jit(ch.sample_transmission_latency_s)
    looped = []
    for step in range(n):
        ul_key, dl_key = jax.random.split(jax.random.fold_in(key, step))
        latency = float(breakdown.slm_s + breakdown.uncertainty_s)
        if transmitted[step]:
            latency += float(
                sample(256000.0, profile.link, ul_key)
                + breakdown.llm_s
                + sample(15.0, profile.link, dl_key)
            )
        looped.append(latency if valid[step] else 0.0)
    np.testing.assert_allclose(eager, looped, rtol=FLOAT32_RTOL)


def test_sequence_latency_on_static_link_by_hand():
    profile = _profile(_static_link())
    b = ch.expected_breakdown(profile)
    transmitted = jnp.array([True, False, True, True, False, True])
    valid = jnp.array([True, True, True, True, True, False])
    key = jax.random.key(0)
    remote = float(b.uplink_s + b.llm_s + b.downlink_s)
    local = float(b.slm_s + b.uncertainty_s)
    total = {
        Mode.UHLM: 5 * local + 3 * remote,
        Mode.HLM: 5 * (local + remote),
        Mode.RAND_HLM: 5 * float(b.slm_s) + 3 * remote,
        Mode.SLM_ONLY: 5 * float(b.slm_s),
        Mode.LLM_ONLY: 5 * float(b.llm_s + b.downlink_s),
    }
    token_latencies_s = jax.jit(ch.token_latencies_s, static_argnums=0)
    for mode, want in total.items():
        got = float(jnp.sum(token_latencies_s(mode, transmitted, valid, profile, key)))
        np.testing.assert_allclose(got, want, rtol=FLOAT32_RTOL, err_msg=str(mode))
    one_row = link_metrics(Mode.UHLM, transmitted[:, None], valid[:, None], profile, key)
    throughput = float(one_row.throughput_tokens_per_s)
    np.testing.assert_allclose(throughput, 5 / total[Mode.UHLM], rtol=FLOAT32_RTOL)


def test_per_token_payload_override():
    profile = _profile(_static_link())
    transmitted = jnp.ones((3,), bool)
    valid = jnp.ones((3,), bool)
    bits = jnp.array([690.0, 256000.0, 23.0])
    got = ch.token_latencies_s(Mode.HLM, transmitted, valid, profile, jax.random.key(0), bits)
    b = ch.expected_breakdown(profile)
    rate = 10e6 * math.log2(11.0)
    want = b.slm_s + b.uncertainty_s + b.llm_s + b.downlink_s + bits / rate
    np.testing.assert_allclose(got, want, rtol=FLOAT32_RTOL)


def test_monte_carlo_sequence_latency_matches_expectation():
    # Given a long U-HLM record on a fading link, the mean per-token latency matches the
    # analytic expectation at the realised skip rate within Monte Carlo error.
    profile = _profile(ch.link_from_budget(ch.LinkPreset.MEDIUM))
    n = 100_000
    transmitted = jax.random.bernoulli(jax.random.key(2), 0.6, (n,))
    latency = jax.jit(ch.token_latencies_s, static_argnums=0)(
        Mode.UHLM, transmitted, jnp.ones((n,), bool), profile, jax.random.key(9)
    )
    skip = 1.0 - float(jnp.mean(transmitted))
    # Conditional on the realised mask, only the fading is random: compare per stratum.
    expected = float(ch.expected_token_latency_s(Mode.UHLM, profile, skip))
    standard_error = float(jnp.std(latency[transmitted])) * math.sqrt(
        float(jnp.sum(transmitted))
    ) / n
    assert abs(float(jnp.mean(latency)) - expected) < MC_STANDARD_ERRORS * standard_error


# --------------------------------------------------------------------------- bad input


def test_negative_bandwidth_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"bandwidth_hz=-1"):
        ch.Link(bandwidth_hz=-1e6, mean_snr_db=10.0)
    with pytest.raises(ValueError, match=r"bandwidth_hz=-5"):
        ch.shannon_rate_bits_per_s(-5.0, 10.0)
    with pytest.raises(ValueError, match=r"bandwidth_hz=-2"):
        ch.link_from_budget(ch.LinkPreset.GOOD, bandwidth_hz=-2.0)


@pytest.mark.parametrize("snr_db", [-60.0, 81.0, float("nan")])
def test_snr_outside_sensible_range_is_rejected(snr_db):
    with pytest.raises(ValueError, match=rf"mean_snr_db={snr_db}.*\[-50, 80\] dB"):
        ch.Link(bandwidth_hz=1e6, mean_snr_db=snr_db)


@pytest.mark.parametrize("k", [0, 32001])
def test_top_k_outside_vocabulary_is_rejected(k):
    with pytest.raises(ValueError, match=rf"top_k={k}.*\[1, vocab_size=32000\]"):
        ch.top_k_bits(k, 32000, 8.0)
    with pytest.raises(ValueError, match=rf"top_k={k}"):
        _profile(_static_link(), top_k=k)


def test_unknown_names_are_rejected_with_choices():
    with pytest.raises(ValueError, match=r"'awful'.*good, medium, poor"):
        ch.LinkPreset.from_name("awful")
    with pytest.raises(ValueError, match=r"'gpt-5'.*tinyllama-1.1b"):
        ch.ModelSize.from_name("gpt-5")
    with pytest.raises(ValueError, match=r"'toaster'.*phone-soc"):
        ch.Device.from_name("toaster")
    with pytest.raises(ValueError, match=r"'bf8'.*float16"):
        ch.Precision.from_name("bf8")
    with pytest.raises(ValueError, match=r"'hlm2'.*uhlm"):
        Mode.from_name("hlm2")
    assert ch.LinkPreset.from_name("poor") is ch.LinkPreset.POOR
    assert ch.ModelSize.from_name("llama-2-7b") is ch.ModelSize.LLAMA_2_7B
    assert ch.Device.from_name("edge-gpu") is ch.Device.EDGE_GPU


def test_skip_rate_outside_unit_interval_is_rejected():
    profile = _profile(_static_link())
    with pytest.raises(ValueError, match=r"skip_rate=1.5"):
        ch.expected_token_latency_s(Mode.UHLM, profile, 1.5)
    with pytest.raises(ValueError, match=r"skip_rate=1.0"):
        ch.speedup_bound(1.0)
