"""Benchmark: NumPyro fits of the rejection model on 10^5 tokens.

DESIGN.md §5 target: a NUTS fit with 2 chains on 10^5 tokens in under 60 s on the
project's 2-core CPU.

Data: 10^5 synthetic tokens, `u` uniform on the 21 values `k/20` (temperature
perturbation with K = 20), `β = 0.82·u − 0.06 + 0.15·ε` for the linear model and hurdle
data (`tests/calibration`-style, same `u`) for the hurdle model and the end-to-end job.

Measured, each as wall time:

* **linear NUTS** as `uhlm fit` runs it (sufficient-statistic likelihood, dense mass
  matrix, 2 chains × (1000 warmup + 1000 draws)) for each chain method: the first run in
  a fresh process (compilation included) and a second run of the same `MCMC` object with
  a new key (compilation excluded). `parallel` runs in a subprocess with two emulated
  host devices (`--xla_force_host_platform_device_count=2`).
* **linear NUTS, per-token likelihood**: the same model written with one observation per
  token (`uhlm_jax.rejection.linear_gaussian`), sequential chains, one run.
* **SVI**: 5000 steps of a full-rank Gaussian guide (4 particles), first and second run.
* **hurdle NUTS**: 2 chains × (1000 + 1000), likelihood grouped by distinct `u`.
* **`uhlm fit` end to end** on a 10^5-token run directory: both models, SVI,
  PSIS-LOO and WAIC (ArviZ) over every token and `loo_draws` draws, predictive checks
  and 1000 prompt-bootstrap replicates.

Writes (replaces) the "## NumPyro fit" section of benchmarks/RESULTS.md.

With `--prompt-effects` it instead times the models with a random intercept per prompt
(`linear_gaussian_prompts`, `hurdle_prompts`), NUTS as `uhlm fit` runs them, and the
leave-one-prompt-out PSIS-LOO of all four models, at the demo's size (36 prompts,
≈ 1 900 tokens, 2 chains × (500 + 500)) and at a real-pair study's size (100 prompts,
6 000 tokens, 2 chains × (1000 + 1000)), each in a fresh process, and writes the
"## NumPyro fit with prompt effects" section.

    .venv/bin/python -m benchmarks.fit [--tokens 100000] [--skip-per-token] [--no-write]
    .venv/bin/python -m benchmarks.fit --prompt-effects [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NUM_TOKENS = 100_000
TARGET_S = 60.0
TRUE = {"slope": 0.82, "intercept": -0.06, "sigma": 0.15}
SECTION = "NumPyro fit"
PROMPT_SECTION = "NumPyro fit with prompt effects"
# (name, prompts, tokens per prompt, warmup = draws per chain) of --prompt-effects.
PROMPT_SIZES = (("demo", 36, 53, 500), ("study", 100, 60, 1000))


def _data(n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    u = (rng.integers(0, 21, n) / 20).astype(np.float32)
    beta = TRUE["slope"] * u + TRUE["intercept"] + TRUE["sigma"] * rng.standard_normal(n)
    return u, beta.astype(np.float32)


def _mcmc(model, method: str, num_warmup: int, num_samples: int, init: dict):
    from numpyro.infer import MCMC, NUTS
    from numpyro.infer.initialization import init_to_value

    kernel = NUTS(model, dense_mass=True, init_strategy=init_to_value(values=init))
    return MCMC(
        kernel,
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=2,
        chain_method=method,
        progress_bar=False,
    )


def time_linear_nuts(method: str, n: int) -> dict:
    """First and second wall time of the linear NUTS fit with one chain method."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from uhlm_jax import rejection

    u, beta = _data(n)
    ls = rejection.least_squares(u, beta)
    init = {"slope": ls["slope"], "intercept": ls["intercept"], "sigma_sq": ls["sigma"] ** 2}
    start = time.perf_counter()
    stats = rejection.LinearStats(*(jnp.float32(x) for x in rejection.linear_stats(u, beta)))
    mcmc = _mcmc(rejection.linear_gaussian_stats, method, 1000, 1000, init)
    mcmc.run(jax.random.key(0), stats, extra_fields=("diverging",))
    draws = jax.block_until_ready(mcmc.get_samples())
    first = time.perf_counter() - start
    start = time.perf_counter()
    mcmc.run(jax.random.key(1), stats, extra_fields=("diverging",))
    jax.block_until_ready(mcmc.get_samples())
    second = time.perf_counter() - start
    return {
        "method": method,
        "first_s": first,
        "second_s": second,
        "slope": float(np.mean(draws["slope"])),
        "divergences": int(np.sum(mcmc.get_extra_fields()["diverging"])),
    }


def time_per_token_nuts(n: int) -> dict:
    import jax
    import jax.numpy as jnp

    from uhlm_jax import rejection

    u, beta = _data(n)
    ls = rejection.least_squares(u, beta)
    init = {"slope": ls["slope"], "intercept": ls["intercept"], "sigma_sq": ls["sigma"] ** 2}
    mcmc = _mcmc(rejection.linear_gaussian, "sequential", 1000, 1000, init)
    start = time.perf_counter()
    mcmc.run(jax.random.key(0), jnp.asarray(u), jnp.asarray(beta))
    jax.block_until_ready(mcmc.get_samples())
    return {"first_s": time.perf_counter() - start}


def time_svi(n: int) -> dict:
    import jax
    import jax.numpy as jnp

    from calibration import fit
    from uhlm_jax import rejection

    u, beta = _data(n)
    ls = rejection.least_squares(u, beta)
    init = {"slope": ls["slope"], "intercept": ls["intercept"], "sigma_sq": ls["sigma"] ** 2}
    stats = rejection.LinearStats(*(jnp.float32(x) for x in rejection.linear_stats(u, beta)))
    cfg = fit.Config(run_dir=".")
    out = {"steps": cfg.svi_steps}
    for name, key in (("first_s", 0), ("second_s", 1)):
        start = time.perf_counter()
        _, summary = fit.run_svi(stats, cfg, jax.random.key(key), init, 2000)
        out[name] = time.perf_counter() - start
        out["slope"] = summary["params"]["slope"]["mean"]
    return out


def time_hurdle_and_job(n: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from calibration import fit
    from tests.helpers import synthetic_records, write_run
    from uhlm_jax import rejection

    tokens_per_prompt = 100
    df = synthetic_records(np.random.default_rng(0), n // tokens_per_prompt, tokens_per_prompt)
    u = df["u_temperature_perturbation"].to_numpy(np.float32)
    beta = df["beta"].to_numpy(np.float32)
    cfg = fit.Config(run_dir=".")
    groups = rejection.HurdleGroups(*(jnp.asarray(x) for x in rejection.hurdle_groups(u, beta)))
    start = time.perf_counter()
    hurdle = fit.run_nuts(
        rejection.hurdle_grouped,
        (groups, cfg.hurdle_prior),
        rejection.HURDLE_SITES,
        cfg,
        jax.random.key(0),
        None,
    )
    hurdle_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        write_run(Path(tmp), df)
        start = time.perf_counter()
        result = fit.run(fit.Config(run_dir=tmp))
        job_s = time.perf_counter() - start
    s = result.summary
    return {
        "hurdle_s": hurdle_s,
        "hurdle_divergences": hurdle.diagnostics["divergences"],
        "job_s": job_s,
        "job_parts": {
            "linear_nuts_s": s["linear"]["nuts"]["seconds"],
            "svi_s": s["linear"]["svi"]["seconds"],
            "hurdle_nuts_s": s["hurdle"]["nuts"]["seconds"],
            "loo_s": s["comparison"]["seconds"],
        },
        "max_r_hat": max(
            p["r_hat"]
            for block in (s["linear"]["nuts"], s["hurdle"]["nuts"])
            for p in block["params"].values()
        ),
        "num_tokens": s["data"]["num_tokens"],
        "loo_draws": s["comparison"]["num_draws"],
    }


def time_prompt_models(size: str) -> dict:
    """Wall time of `uhlm fit`'s four NUTS fits and its comparison on hurdle records."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from calibration import fit
    from tests.helpers import synthetic_records, write_run

    _, prompts, tokens, iterations = next(s for s in PROMPT_SIZES if s[0] == size)
    df = synthetic_records(np.random.default_rng(0), prompts, tokens)
    with tempfile.TemporaryDirectory() as tmp:
        write_run(Path(tmp), df)
        start = time.perf_counter()
        result = fit.run(
            fit.Config(run_dir=tmp, num_warmup=iterations, num_samples=iterations)
        )
        job_s = time.perf_counter() - start
    s = result.summary
    return {
        "size": size,
        "num_prompts": prompts,
        "num_tokens": s["data"]["num_tokens"],
        "iterations": iterations,
        "job_s": job_s,
        "nuts_s": {m: s[m]["nuts"]["seconds"] for m in fit.MODEL_SITES},
        "leapfrog": {m: s[m]["nuts"]["mean_leapfrog_steps"] for m in fit.MODEL_SITES},
        "divergences": {m: s[m]["nuts"]["divergences"] for m in fit.MODEL_SITES},
        "max_r_hat": {
            m: max(p["r_hat"] for p in s[m]["nuts"]["params"].values()) for m in fit.MODEL_SITES
        },
        "loo_s": s["comparison"]["seconds"],
        "best": s["comparison"]["best"],
    }


def prompt_effects(write: bool) -> None:
    load_before = os.getloadavg()
    rows = [_child(f"prompts:{name}", 0) for name, *_ in PROMPT_SIZES]
    load_after = os.getloadavg()
    print(json.dumps(rows, indent=1))
    if not write:
        return
    from benchmarks.results import machine, write_section

    table = "\n".join(
        f"| {r['size']} | {r['num_prompts']} | {r['num_tokens']:,} | 2 × ({r['iterations']} + "
        f"{r['iterations']}) | "
        + " | ".join(
            f"{r['nuts_s'][m]:.1f} s ({r['leapfrog'][m]:.0f}, {r['divergences'][m]}, "
            f"{r['max_r_hat'][m]:.3f})"
            for m in ("linear_prompt", "hurdle_prompt")
        )
        + f" | {r['loo_s']:.1f} s | {r['job_s']:.1f} s | {r['best']} |"
        for r in rows
    )
    body = f"""
`benchmarks/fit.py --prompt-effects`; {machine()}; load average {load_before[0]:.1f} \
before, {load_after[0]:.1f} after.

`uhlm fit` on synthetic hurdle records (`tests.helpers.synthetic_records`), each size in \
a fresh process (compilation included). The models with a random intercept per prompt \
run NUTS on per-prompt sufficient statistics (linear) and on tokens grouped by prompt and \
`u` (hurdle), with a dense mass matrix over the global parameters and a diagonal one over \
the prompt effects; a cell gives the NUTS time (mean leapfrog steps, divergences, largest \
r-hat). PSIS-LOO leaves out whole prompts, integrating the prompt effects out by adaptive \
Gauss-Hermite quadrature.

| size | prompts | tokens | chains × (warmup + draws) | linear_prompt NUTS | \
hurdle_prompt NUTS | leave-one-prompt-out LOO, 4 models | `uhlm fit` total | best |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{table}
"""
    write_section(PROMPT_SECTION, body)
    print(f"wrote the '{PROMPT_SECTION}' section of benchmarks/RESULTS.md")


def _child(kind: str, n: int, env_flags: str | None = None) -> dict:
    """Runs one measurement in a fresh interpreter, so compile time is honest."""
    env = dict(os.environ)
    if env_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + env_flags).strip()
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.fit", "--child", kind, "--tokens", str(n)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _verdict(seconds: float) -> str:
    return f"meets ({TARGET_S / seconds:.1f}× under)" if seconds < TARGET_S else "misses"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=NUM_TOKENS)
    parser.add_argument("--skip-per-token", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--prompt-effects", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = args.tokens
    if args.prompt_effects and not args.child:
        prompt_effects(not args.no_write)
        return

    if args.child:
        kind = args.child
        if kind.startswith("nuts:"):
            result = time_linear_nuts(kind.split(":")[1], n)
        elif kind == "per_token":
            result = time_per_token_nuts(n)
        elif kind == "svi":
            result = time_svi(n)
        elif kind.startswith("prompts:"):
            result = time_prompt_models(kind.split(":")[1])
        else:
            result = time_hurdle_and_job(n)
        print(json.dumps(result))
        return

    load_before = os.getloadavg()
    nuts = [
        _child("nuts:sequential", n),
        _child("nuts:vectorized", n),
        _child("nuts:parallel", n, "--xla_force_host_platform_device_count=2"),
    ]
    per_token = None if args.skip_per_token else _child("per_token", n)
    svi = _child("svi", n)
    job = _child("job", n)
    load_after = os.getloadavg()
    for row in nuts:
        print(f"linear NUTS {row['method']}: {row['first_s']:.1f} s / {row['second_s']:.1f} s")
    print(json.dumps({"per_token": per_token, "svi": svi, "job": job}, indent=1))
    if args.no_write:
        return

    from benchmarks.results import machine, write_section

    rows = "\n".join(
        f"| {r['method']} | {r['first_s']:.1f} s | {r['second_s']:.1f} s | "
        f"{r['divergences']} | {_verdict(r['first_s'])} |"
        for r in nuts
    )
    fastest = min(nuts, key=lambda r: r["first_s"])
    per_token_line = (
        "not measured (`--skip-per-token`)"
        if per_token is None
        else f"{per_token['first_s']:.1f} s ({_verdict(per_token['first_s'])})"
    )
    parts = job["job_parts"]
    body = f"""
`benchmarks/fit.py`; {machine()}; load average {load_before[0]:.1f} before, \
{load_after[0]:.1f} after (the machine is shared, so times are upper bounds).

Linear-Gaussian model `β ~ Normal(a·u + b, σ)` on {n:,} synthetic tokens, NUTS with a \
dense mass matrix, 2 chains × (1000 warmup + 1000 draws), as `uhlm fit` runs it: the \
likelihood in six sufficient statistics (exact). "First" is a fresh process (compilation \
included), "second" reruns the same `MCMC` with a new key (compilation excluded). \
Target (DESIGN.md §5): < {TARGET_S:.0f} s.

| chain method | first | second | divergences | vs target (first) |
| --- | --- | --- | --- | --- |
{rows}

Fastest here: `{fastest["method"]}`. `parallel` needs one device per chain (here two \
emulated host devices, set before JAX starts); `uhlm fit` uses it when devices allow and \
`vectorized` otherwise.

- Same model with one likelihood term per token (`linear_gaussian`), sequential chains: \
{per_token_line}.
- SVI, full-rank Gaussian guide, {svi["steps"]} Adam steps × 4 particles on the \
sufficient statistics: {svi["first_s"]:.1f} s first, {svi["second_s"]:.1f} s second.
- Hurdle model (logistic × Beta), NUTS 2 × (1000 + 1000), default chain method, on \
{job["num_tokens"]:,} tokens grouped by their 21 distinct `u`: {job["hurdle_s"]:.1f} s \
(compilation included), {job["hurdle_divergences"]} divergences.
- `uhlm fit` end to end on a {job["num_tokens"]:,}-token run directory: \
{job["job_s"]:.1f} s (linear NUTS {parts["linear_nuts_s"]:.1f} s, SVI \
{parts["svi_s"]:.1f} s, hurdle NUTS {parts["hurdle_nuts_s"]:.1f} s, PSIS-LOO and WAIC \
of both models (ArviZ) over every token and {job["loo_draws"]} draws {parts["loo_s"]:.1f} s; \
the rest is predictive checks, 1000 \
prompt-bootstrap replicates and I/O); largest r-hat {job["max_r_hat"]:.3f}.
"""
    write_section(SECTION, body)
    print(f"wrote the '{SECTION}' section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
