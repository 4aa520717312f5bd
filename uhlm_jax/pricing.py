"""What a generated token is priced as: a link, two deployed models and the uplink payload.

`Pricing` names every choice (link preset, models, devices, precisions, payload) and builds
the `uhlm_jax.channel.CostProfile` they describe. Cost profiles by name
(`COST_PROFILES`): `named` prices named model profiles (by default the paper's
TinyLlama-1.1B and Llama-2-7B, V = 32 000, float16); `pair` prices a measured pair's own
models at the dtype they run in, with the pair's V on the uplink (`pair_profile`).
`cost_caption` states which models a table prices.
"""

from __future__ import annotations

import dataclasses
import os

from uhlm_jax import channel as ch
from uhlm_jax.models.config import ModelConfig

__all__ = [
    "COST_PROFILES",
    "COST_PROFILE_HELP",
    "NAMED_COSTS",
    "PAIR_COSTS",
    "PAPER_SKIP_RATE",
    "Pricing",
    "check_cost_profile",
    "cost_caption",
    "pair_profile",
]

# Skip rate reported for U-HLM with TinyLlama-1.1B / Llama-2-7B (arXiv 2412.12687).
PAPER_SKIP_RATE = 0.4593
# Cost profiles: the named model profiles (the paper's pair by default), or the pair's own.
NAMED_COSTS = "named"
PAIR_COSTS = "pair"
COST_PROFILES = (NAMED_COSTS, PAIR_COSTS)
COST_PROFILE_HELP = (
    f"models to price: {NAMED_COSTS} (the paper's TinyLlama-1.1B and Llama-2-7B, V = 32 000) "
    f"or {PAIR_COSTS} (the run's pair, its dtype and V) (default: {NAMED_COSTS})"
)


def check_cost_profile(name: str) -> None:
    """Raises ValueError unless `name` is one of `COST_PROFILES`."""
    if name not in COST_PROFILES:
        raise ValueError(
            f"unknown cost profile {name!r}; use one of: {', '.join(COST_PROFILES)}"
        )


@dataclasses.dataclass(frozen=True)
class Pricing:
    """What to price: the link, the models and their devices, the payload, the skip rate.

    Attributes:
        preset: named link conditions.
        snr_db: mean SNR in dB replacing the preset's; None keeps it.
        bandwidth_hz: bandwidth replacing the preset's (the SNR follows, unless `snr_db`).
        fading: fading model of the link.
        skip_rate: share of tokens U-HLM (and Rand-HLM) do not transmit, in [0, 1).
        slm_model, slm_device, slm_precision: the drafting model and where it runs.
        llm_model, llm_device, llm_precision: the verifying model and where it runs. A
            precision of None is the profile's: float16 for named models, the pair's dtype
            for a pair.
        pair: a measured pair whose own models replace `slm_model` and `llm_model`, and
            whose V the uplink carries (the `pair` cost profile); None prices the named
            models, with the LLM's V.
        context_tokens: cached tokens attended to per step, for both models.
        bits_per_prob: bits per uplinked probability.
        top_k: CU-HLM truncation k; None sends the full distribution.
        uncertainty_samples: K of the temperature-perturbation uncertainty.
    """

    preset: ch.LinkPreset = ch.LinkPreset.MEDIUM
    snr_db: float | None = None
    bandwidth_hz: float | None = None
    fading: ch.Fading = ch.Fading.RAYLEIGH
    skip_rate: float = PAPER_SKIP_RATE
    slm_model: ch.ModelSize = ch.ModelSize.TINYLLAMA_1_1B
    slm_device: ch.Device = ch.Device.PHONE_SOC
    slm_precision: ch.Precision | None = None
    llm_model: ch.ModelSize = ch.ModelSize.LLAMA_2_7B
    llm_device: ch.Device = ch.Device.DATACENTER_GPU
    llm_precision: ch.Precision | None = None
    context_tokens: int = 512
    bits_per_prob: float = 16.0
    top_k: int | None = None
    uncertainty_samples: int = 20
    pair: ch.PairProfile | None = None

    def __post_init__(self):
        for name, kind in [
            ("preset", ch.LinkPreset),
            ("fading", ch.Fading),
            ("slm_model", ch.ModelSize),
            ("slm_device", ch.Device),
            ("slm_precision", ch.Precision | None),
            ("llm_model", ch.ModelSize),
            ("llm_device", ch.Device),
            ("llm_precision", ch.Precision | None),
            ("pair", ch.PairProfile | None),
        ]:
            if not isinstance(getattr(self, name), kind):
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is invalid: use a {kind.__qualname__} "
                    f"(parse names with {kind.__qualname__}.from_name)"
                )
        if not (isinstance(self.skip_rate, int | float) and 0 <= self.skip_rate < 1):
            raise ValueError(
                f"skip_rate={self.skip_rate!r} is invalid: it must lie in [0, 1)"
            )
        # Building the profile validates SNR, bandwidth, top_k and the rest.
        self.cost_profile()

    def link(self) -> ch.Link:
        """The link this configuration describes."""
        return ch.link_from_budget(
            self.preset, bandwidth_hz=self.bandwidth_hz, snr_db=self.snr_db, fading=self.fading
        )

    def cost_profile(self) -> ch.CostProfile:
        """The cost profile this configuration describes (V: the LLM's, or the pair's)."""
        if self.pair is None:
            slm, llm, precision = self.slm_model, self.llm_model, ch.Precision.FLOAT16
        else:
            slm, llm, precision = self.pair.slm, self.pair.llm, self.pair.precision
        llm_deployment = ch.Deployment(
            llm, self.llm_device, self.llm_precision or precision, self.context_tokens
        )
        return ch.CostProfile(
            slm=ch.Deployment(
                slm, self.slm_device, self.slm_precision or precision, self.context_tokens
            ),
            llm=llm_deployment,
            link=self.link(),
            vocab_size=llm_deployment.model_profile.vocab_size,
            bits_per_prob=self.bits_per_prob,
            top_k=self.top_k,
            uncertainty_samples=self.uncertainty_samples,
        )


def pair_profile(
    cost_profile: str,
    pair: str | None = None,
    configs: tuple[ModelConfig, ModelConfig] | None = None,
    dtype: str = "float32",
) -> ch.PairProfile | None:
    """The pair a cost profile prices (`Pricing.pair`), from its name.

    Args:
        cost_profile: one of `COST_PROFILES`.
        pair: the pair to price (a name or "SLM,LLM", as `uhlm_jax.pair.load_pair` takes it).
        configs: the SLM's and the LLM's configs, as a run records them; None loads the pair.
        dtype: the parameter dtype of `configs` (a loaded pair has its own).

    Returns:
        None for `named`; for `pair`, the pair's own models, precision and V.

    Raises:
        ValueError: for an unknown profile name, or `pair` with no pair to price.
    """
    check_cost_profile(cost_profile)
    if cost_profile == NAMED_COSTS:
        return None
    if not pair:
        raise ValueError(
            "the 'pair' cost profile needs a pair: a run directory whose config.json names "
            "it, or --pair NAME"
        )
    if configs is None:
        from uhlm_jax.pair import load_pair

        loaded = load_pair(pair)
        configs, dtype = (loaded.slm.config, loaded.llm.config), loaded.slm.dtype
    names = _model_names(pair)
    slm, llm = (ch.ModelProfile.from_config(c, n) for c, n in zip(configs, names, strict=True))
    return ch.PairProfile(pair, slm, llm, ch.Precision.from_dtype(dtype))


def _model_names(pair: str) -> tuple[str, str]:
    """The SLM's and the LLM's names in a pair's name (a named pair's, or "SLM,LLM")."""
    from uhlm_jax.pair import PAIR_SEPARATOR, PAIRS

    if pair in PAIRS:
        return PAIRS[pair]
    if PAIR_SEPARATOR in pair:
        slm, llm = pair.split(PAIR_SEPARATOR, 1)
        return os.path.basename(slm.rstrip("/")), os.path.basename(llm.rstrip("/"))
    return f"{pair} SLM", f"{pair} LLM"


def cost_caption(profile: ch.CostProfile, pair: ch.PairProfile | None) -> str:
    """Which models a cost profile prices, as table captions state it."""
    which = (
        f"cost profile '{NAMED_COSTS}'" if pair is None
        else f"cost profile '{PAIR_COSTS}' (pair {pair.name})"
    )
    slm, llm = profile.slm, profile.llm
    return (
        f"{which}: {slm.model_profile.name} {slm.precision.name.lower()} on "
        f"{slm.device_profile.name}, {llm.model_profile.name} {llm.precision.name.lower()} on "
        f"{llm.device_profile.name}, V = {profile.vocab_size}"
    )
