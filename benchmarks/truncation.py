"""How much CU-HLM's truncated uplink breaks exactness, on real distributions.

For the `smollm2-exit` pair (SmolLM2-135M-Instruct and its early-exit draft), teacher-forced
over the shipped evaluation prompts' reference answers, every position gives a draft
distribution `q` and an LLM distribution `p`. For each top-k, the uplink sends `x̂` (top-k
of `q`, the rest spread uniformly) and the LLM verifies against it, so the emitted token
follows `e ≠ p` (`uhlm_jax.truncation.emitted_distribution`). Reported per k: the payload,
the distortion `TV(q, x̂)` and the exactness loss `TV(e, p)`, averaged over positions.

Usage: .venv/bin/python -m benchmarks.truncation [--prompts 8]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.results import machine, write_section
from calibration.prompts import embedded_prompts_path, read_prompts
from uhlm_jax import channel
from uhlm_jax.models.llama import forward
from uhlm_jax.pair import load_pair
from uhlm_jax.rollout import encode_prompts
from uhlm_jax.truncation import distortion_tv, exactness_loss_tv, truncate

TOP_K = (1, 8, 32, 128, 512, 2048)
BITS_PER_PROB = 16


def distributions(pair, texts):
    """Teacher-forced `log q`, `log p` at every real position `[positions, v]`."""
    encoded = encode_prompts(pair, texts)
    width = max(map(len, encoded))
    tokens = np.full((len(encoded), width), pair.tokenizer.pad_id, np.int32)
    for row, ids in enumerate(encoded):
        tokens[row, : len(ids)] = ids
    lengths = np.array([len(ids) for ids in encoded])
    log_q = jax.nn.log_softmax(forward(pair.slm, tokens, lengths), axis=-1)
    log_p = jax.nn.log_softmax(forward(pair.llm, tokens, lengths), axis=-1)
    real = np.arange(width)[None, :] < lengths[:, None]
    return log_q[real], log_p[real]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    pair = load_pair("smollm2-exit")
    prompts = read_prompts(embedded_prompts_path(), "evaluation")[: args.prompts]
    texts = [f"{p.text}\n{p.reference}" for p in prompts]
    log_q, log_p = distributions(pair, texts)
    vocab = log_q.shape[-1]
    rows = []
    for k in TOP_K:

        def one(lq, lp, k=k):
            x_hat = truncate(lq, k)
            return distortion_tv(lq, k), exactness_loss_tv(lq, x_hat, lp)

        distortion, loss = jax.jit(jax.vmap(one))(log_q, log_p)
        bits = int(channel.top_k_bits(k, vocab, BITS_PER_PROB))
        rows.append(
            f"| {k} | {bits:,} | {float(jnp.mean(distortion)):.4f} | "
            f"{float(jnp.mean(loss)):.4f} | {float(jnp.max(loss)):.4f} |"
        )
        print(rows[-1], flush=True)
    full_bits = int(channel.full_distribution_bits(vocab, BITS_PER_PROB))
    body = "\n".join(
        [
            f"Machine: {machine()}.",
            "",
            f"`smollm2-exit` pair, {log_q.shape[0]} teacher-forced positions of {len(texts)} "
            f"evaluation prompts with their reference answers; {BITS_PER_PROB} bits per "
            f"probability (the full distribution is {full_bits:,} bits). Verifying against "
            "the truncated `x̂` makes the emitted law `e` differ from the LLM's `p`; "
            "`TV(e, p)` is computed exactly, not sampled.",
            "",
            "| top-k | uplink bits | mean TV(q, x̂) | mean TV(e, p) | max TV(e, p) |",
            "| --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    write_section("CU-HLM truncation: exactness loss", body)


if __name__ == "__main__":
    main()
