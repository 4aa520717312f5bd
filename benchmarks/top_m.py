"""The temperature-perturbation gate from top-M partition functions against the full sums.

Times, per batch of `b` rows of random logits at vocabulary `V`, best of 3 after compiling:
- *full*: `vmap(TemperaturePerturbation())`, `K · V` exponentials per row;
- *top-M, certain*: `top_m_rows` on rows whose re-draws its top-M logits all decide
  (a 60-nat spike), so only the top-M branch runs;
- *top-M, fallback*: `top_m_rows` on rows it leaves undecided, where it runs the check and
  then the full sums;
- *per-row select*: the same choice made per row inside `vmap`, where `lax.cond` becomes a
  select and both branches run (the design `top_m_rows` avoids).

It also reports how often a batch is decided by its top-M logits on synthetic rows
(standard normal logits times 2 with one token raised by a gap), to show when the
top-M branch runs at all; next-token logits of real models were not measured here.

Usage: .venv/bin/python -m benchmarks.top_m [--quick]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.results import best_seconds, machine, write_section
from uhlm_jax.uncertainty import TemperaturePerturbation, disagreement_share

VOCABS = (49_152, 151_936)
BATCHES = (1, 32)
TOP_MS = (256, 1024)
GAPS = (5.0, 10.0, 20.0, 40.0)  # nats between the raised token and the rest's scale
CERTAIN_TRIALS = 20  # batches per gap for the certain share
MEASURE = TemperaturePerturbation()


def _rows(batch: int, vocab: int, scale: float, gap: float, seed: int = 0):
    key_logits, key_rows = jax.random.split(jax.random.key(seed))
    logits = scale * jax.random.normal(key_logits, (batch, vocab), jnp.float32)
    logits = logits.at[:, 0].add(gap)
    return jax.random.split(key_rows, batch), logits, jnp.zeros((batch,), jnp.int32)


def _decided(keys, logits, drafts, top_m: int) -> bool:
    """Whether the top-M logits decide every re-draw of the batch."""
    _, certain = jax.vmap(MEASURE.top_m_decisions, in_axes=(0, 0, 0, None))(
        keys, logits, drafts, top_m
    )
    return bool(jnp.all(certain))


def _undecided_rows(batch: int, vocab: int, top_m: int):
    """Rows of `2·N(0, 1)` logits, one raised by 10 nats, that the top-M logits leave
    undecided (the first such seed), so `top_m_rows` falls back."""
    for seed in range(100):
        rows = _rows(batch, vocab, scale=2.0, gap=10.0, seed=seed)
        if not _decided(*rows, top_m):
            return rows
    raise RuntimeError(f"no undecided batch of {batch} rows at V={vocab}, M={top_m}")


def _per_row_select(key, logits, draft, top_m):
    disagree, certain = MEASURE.top_m_decisions(key, logits, draft, top_m)
    return jax.lax.cond(
        jnp.all(certain),
        lambda: disagreement_share(disagree),
        lambda: MEASURE(key, logits, logits, draft),
    )


def time_cells(quick: bool) -> list[tuple]:
    full = jax.jit(
        lambda keys, logits, drafts, top_m: jax.vmap(MEASURE)(keys, logits, logits, drafts),
        static_argnums=3,
    )
    batched = jax.jit(MEASURE.top_m_rows, static_argnums=3)
    select = jax.jit(jax.vmap(_per_row_select, in_axes=(0, 0, 0, None)), static_argnums=3)
    rows = []
    for vocab in VOCABS[:1] if quick else VOCABS:
        for batch in BATCHES:
            peaked = _rows(batch, vocab, scale=1.0, gap=60.0)
            for top_m in TOP_MS[:1] if quick else TOP_MS:
                assert _decided(*peaked, top_m)
                undecided = _undecided_rows(batch, vocab, top_m)
                cells = {}
                # Interleaved so that the load changes each column alike.
                for name, fn, args in (
                    ("full", full, peaked),
                    ("certain", batched, peaked),
                    ("fallback", batched, undecided),
                    ("select", select, peaked),
                ):
                    call = functools.partial(fn, *args, top_m)
                    call()
                    cells[name] = 1e3 * best_seconds(call, repeats=3)
                rows.append((vocab, batch, top_m, cells))
                print(vocab, batch, top_m, cells, flush=True)
    return rows


def certain_shares(vocab: int, batch: int, top_m: int) -> dict[float, float]:
    """Share of `CERTAIN_TRIALS` batches whose every re-draw the top-M logits decide."""
    shares = {}
    for gap in GAPS:
        hits = [
            _decided(*_rows(batch, vocab, scale=2.0, gap=gap, seed=seed), top_m)
            for seed in range(CERTAIN_TRIALS)
        ]
        shares[gap] = float(np.mean(hits))
    return shares


def report(cells: list[tuple], shares: dict[tuple, dict[float, float]]) -> str:
    lines = [
        f"Machine: {machine()}. The machine was shared with many other jobs throughout: "
        "every time is an upper bound, and runs of the same code differ by up to 2×.",
        "",
        "The temperature-perturbation gate (K = 20, θ_max = 2) per batch of random logits,"
        " best of 3 after compiling, ms. *Top-M, certain*: every re-draw decided by the top-M"
        " logits (`TemperaturePerturbation.top_m_rows`, one `lax.cond` per batch), so only"
        " `top_k`, one pass of V exponentials and K·M exponentials per row run. *Fallback*:"
        " a row is undecided, so the check and then the full sums run. *Per-row select*: the"
        " choice made per row under `vmap`, which runs both branches.",
        "",
        "| V | batch | M | full | top-M, certain | top-M, fallback | per-row select |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for vocab, batch, top_m, c in cells:
        lines.append(
            f"| {vocab:,} | {batch} | {top_m} | {c['full']:.1f} | {c['certain']:.1f} | "
            f"{c['fallback']:.1f} | {c['select']:.1f} |"
        )
    lines += [
        "",
        f"Share of {CERTAIN_TRIALS} batches decided by their top-M logits (so that the top-M"
        " branch runs), synthetic rows: logits 2·N(0, 1) with one token raised by the gap.",
        "",
        "| V | batch | M | " + " | ".join(f"gap {g:g}" for g in GAPS) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in GAPS) + " |",
    ]
    for (vocab, batch, top_m), by_gap in shares.items():
        lines.append(
            f"| {vocab:,} | {batch} | {top_m} | "
            + " | ".join(f"{by_gap[g]:.2f}" for g in GAPS)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="V = 49,152 and M = 256 only")
    args = parser.parse_args(argv)
    cells = time_cells(args.quick)
    vocab = VOCABS[0] if args.quick else VOCABS[-1]
    shares = {}
    for batch in BATCHES:
        for top_m in TOP_MS:
            shares[(vocab, batch, top_m)] = certain_shares(vocab, batch, top_m)
            print(vocab, batch, top_m, shares[(vocab, batch, top_m)], flush=True)
    write_section("Top-M partition functions of the gate", report(cells, shares))


if __name__ == "__main__":
    main()
