"""Choosing the exit layer L of SmolLM2-135M-Instruct's early-exit draft.

For each L, the draft runs the full model's first L layers, one exit block and a final
norm in front of the tied head. This measures, on the full model's replies to the
held-out prompts (splits other than `train`):

- the draft's FLOPs per token as a fraction of the full model's;
- the acceptance `1 − TV(p, q)` (mean over reply positions, standard error clustered by
  reply) of the untrained draft (exit block = the full model's layer L, final norm = the
  full model's: the plain early exit after L + 1 layers) and of the draft trained with
  `uhlm train-draft`'s recipe (same data, optimiser and epochs for every L);
- the training time.

It writes the "Early-exit draft" section of `benchmarks/RESULTS.md`, including the
acceptance of the committed exit head. Run it as `python -m benchmarks.draft_choice`
(`--exit-layers 6 9 12 15`, `--epochs`, `--workdir` to reuse cached replies).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from benchmarks.results import machine, write_section
from calibration import train_draft
from uhlm_jax.models import early_exit as ee
from uhlm_jax.models.registry import load_model

TITLE = "Early-exit draft"
TARGET_ACCEPTANCE = 0.5
TARGET_FLOPS = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[6, 9, 12, 15])
    parser.add_argument("--epochs", type=int, default=train_draft.Config().epochs)
    parser.add_argument("--learning-rate", type=float, default=train_draft.Config().learning_rate)
    parser.add_argument("--workdir", default="runs/train-draft", help="shared with train-draft")
    parser.add_argument("--no-write", action="store_true", help="print, do not edit RESULTS.md")
    args = parser.parse_args()

    base = train_draft.Config(
        epochs=args.epochs, learning_rate=args.learning_rate, workdir=args.workdir
    )
    model = load_model(base.model)
    params = model.params
    start = time.perf_counter()
    train, heldout = train_draft.load_sequences(base, params, model.tokenizer)
    train_features = train_draft.compute_features(params, train, args.exit_layers)
    heldout_features = train_draft.compute_features(params, heldout, args.exit_layers)
    data_s = time.perf_counter() - start

    rows = []
    for exit_layer in args.exit_layers:
        cfg = train_draft.Config(
            exit_layer=exit_layer,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            workdir=args.workdir,
            output=os.path.join(args.workdir, f"exit_head_L{exit_layer}.safetensors"),
        )
        head = ee.init_exit_head(params, exit_layer)
        untrained = train_draft.measure_acceptance(
            params, head, heldout, heldout_features[exit_layer]
        )
        # The same folder as `uhlm train-draft` with these settings: a rerun resumes.
        checkpoints = train_draft.checkpoint_dir(cfg)
        start = time.perf_counter()
        head, steps, loss = train_draft.train_head(
            cfg, params, head, train, train_features[exit_layer], checkpoints
        )
        train_s = time.perf_counter() - start
        ee.save_exit_head(cfg.output, head, params.config)
        stored, _ = ee.load_exit_head(cfg.output, params.config)
        trained = train_draft.measure_acceptance(
            params, stored, heldout, heldout_features[exit_layer]
        )
        rows.append(
            dict(
                exit_layer=exit_layer,
                flops=ee.draft_flops_fraction(params.config, exit_layer),
                untrained=untrained,
                trained=trained,
                steps=steps,
                loss=loss,
                train_s=train_s,
            )
        )
        print(json.dumps({k: str(v) for k, v in rows[-1].items()}), flush=True)

    embedded = _embedded_row(params, heldout, train_draft, base)
    body = _table(rows, embedded, base, train, heldout, data_s)
    print(body)
    if not args.no_write:
        write_section(TITLE, body)


def _embedded_row(params, heldout, module, base) -> str:
    path = ee.embedded_exit_head_path()
    if not os.path.isfile(path):
        return "The committed exit head is missing."
    head, _ = ee.load_exit_head(path, params.config)
    features = module.compute_features(params, heldout, [head.exit_layer], progress=False)
    got = module.measure_acceptance(params, head, heldout, features[head.exit_layer])
    with open(os.path.splitext(path)[0] + ".json") as f:
        stated = json.load(f)
    return (
        f"Committed head (`uhlm_jax/data/{ee.EMBEDDED_EXIT_HEAD_FILE}`, float16, "
        f"{os.path.getsize(path) / 2**20:.1f} MiB): L = {head.exit_layer}, "
        f"{ee.draft_flops_fraction(params.config, head.exit_layer):.1%} of the FLOPs, "
        f"acceptance {got.mean:.3f} ± {got.se:.3f} here (stated in its JSON: "
        f"{stated['acceptance']:.3f} ± {stated['acceptance_se']:.3f}); trained by "
        f"`uhlm train-draft` with {stated['train_config']['epochs']} epochs at peak learning "
        f"rate {stated['train_config']['learning_rate']} ({stated['steps']} steps)."
    )


def _table(rows, embedded, base, train, heldout, data_s) -> str:
    lines = [
        f"Machine: {machine()}.",
        "",
        "SmolLM2-135M-Instruct (30 layers). Draft = first L layers + one exit block + final "
        "RMSNorm + the tied head. Acceptance = mean `1 − TV(p, q)` over the reply positions "
        f"of the full model's replies to the {len(heldout.tokens)} held-out prompts "
        f"(temperature-1 distributions, replies sampled at T = {base.temperature}, "
        f"≤ {base.max_new_tokens} tokens), ± standard error clustered by reply. "
        "Untrained: the exit block is the full model's layer L and the norm its final norm "
        "(the plain early exit after L + 1 layers). Trained: KL distillation on "
        f"{len(train.tokens)} replies to the train prompts "
        f"({sum(len(x) for x in train.tokens)} tokens), AdamW, {base.epochs} epoch(s), "
        f"batch {base.batch_size} replies, peak learning rate {base.learning_rate}. "
        f"Sampling the replies and the hidden-state pass took {data_s:.0f} s.",
        "",
        "| L | draft layers | FLOPs vs full | acceptance untrained | acceptance trained "
        "| steps | final KL | train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        u, t = r["untrained"], r["trained"]
        lines.append(
            f"| {r['exit_layer']} | {r['exit_layer'] + 1} | {r['flops']:.1%} "
            f"| {u.mean:.3f} ± {u.se:.3f} | {t.mean:.3f} ± {t.se:.3f} | {r['steps']} "
            f"| {r['loss']:.3f} | {r['train_s']:.0f} s |"
        )
    feasible = [r for r in rows if r["flops"] <= TARGET_FLOPS]
    if feasible:
        best = max(feasible, key=lambda r: r["trained"].mean)
        met = best["trained"].mean >= TARGET_ACCEPTANCE
        lines += [
            "",
            f"Best within the FLOPs target (≤ {TARGET_FLOPS:.0%}): L = {best['exit_layer']}, "
            f"acceptance {best['trained'].mean:.3f} at {best['flops']:.1%} of the FLOPs; "
            f"target acceptance ≥ {TARGET_ACCEPTANCE} "
            f"{'met' if met else 'not met'}.",
        ]
    lines += [
        "",
        embedded,
        "",
        "Train times are wall-clock seconds on the shared 2-core machine and vary with its load.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
