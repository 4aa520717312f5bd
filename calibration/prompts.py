"""Prompt files: JSON Lines with `{"prompt": ...}` or Alpaca-style records.

Alpaca records have `instruction`, an optional `input` and an optional `output`; the
prompt is the instruction followed by the input, and `output` is kept as the reference
answer (used for accuracy metrics). An optional `split` field ("train", "calibration",
"evaluation") keeps the prompts that train the draft, calibrate and evaluate disjoint.
`{"prompt": ...}` records may also carry `answer`, the short string (a number, a name, a
word, "yes" or "no") that a correct reply contains.

The project ships 513 prompts with references and splits (`embedded_prompts_path()`).
"""

from __future__ import annotations

import importlib.resources
import json
import os
from typing import NamedTuple

__all__ = [
    "CALIBRATION_SPLIT",
    "Prompt",
    "collection_source",
    "embedded_prompts_path",
    "read_prompts",
    "select_prompts",
]

# The shipped prompts' split that calibration uses when no split is given.
CALIBRATION_SPLIT = "calibration"


class Prompt(NamedTuple):
    """One prompt, its reference answer, split and short answer (empty when absent)."""

    text: str
    reference: str
    split: str = ""
    answer: str = ""


def embedded_prompts_path() -> str:
    """The prompt file shipped with the package (`uhlm_jax/data/prompts.jsonl`)."""
    return str(importlib.resources.files("uhlm_jax") / "data" / "prompts.jsonl")


def collection_source(prompts: str | None, split: str | None) -> tuple[str, str | None]:
    """The file and split a collection reads: `prompts` and `split`, or by default the
    shipped prompts' calibration split."""
    if prompts is None:
        return embedded_prompts_path(), CALIBRATION_SPLIT if split is None else split
    return prompts, split


def _parse(line_number: int, record: object, path: str) -> Prompt:
    where = f"{path}, line {line_number}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    answer = ""
    if "prompt" in record:
        text, reference = record["prompt"], record.get("reference", record.get("output", ""))
        answer = record.get("answer", "")
    elif "instruction" in record:
        text = record["instruction"]
        if record.get("input"):
            text = f"{text}\n\n{record['input']}"
        reference = record.get("output", "")
    else:
        raise ValueError(
            f"{where}: a record needs a 'prompt' key, or Alpaca-style 'instruction' (with "
            f"optional 'input' and 'output'); found keys {sorted(record)}."
        )
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: the prompt is empty or not a string: {text!r}.")
    return Prompt(
        text=text,
        reference=str(reference or ""),
        split=str(record.get("split", "")),
        answer=str(answer or ""),
    )


def read_prompts(path: str | os.PathLike, split: str | None = None) -> list[Prompt]:
    """Reads a JSON Lines prompt file (blank lines are skipped).

    Args:
        path: the file.
        split: keep only prompts whose `split` field equals this; None keeps all.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: naming the file and line, for malformed JSON, a record without a
            prompt, or a file with no prompts at all.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Prompt file not found: {path}")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}).") from err
            prompts.append(_parse(number, record, path))
    if not prompts:
        raise ValueError(
            f"Prompt file {path} contains no prompts; add JSON Lines such as "
            '{"prompt": "What is the capital of France?"}.'
        )
    if split is not None:
        splits = sorted({p.split for p in prompts})
        prompts = [p for p in prompts if p.split == split]
        if not prompts:
            raise ValueError(
                f"Prompt file {path} has no prompts in split {split!r}; its splits are {splits}."
            )
    return prompts


def select_prompts(
    path: str | os.PathLike, split: str | None, first: int = 0, count: int | None = None
) -> list[Prompt]:
    """The prompts a job runs: those of `split` in `path`, after the first `first`, at
    most `count` (None: all).

    Raises:
        ValueError: naming the flag, when nothing is left after `first` or `count` asks
            for more prompts than there are (never cut silently).
    """
    path = os.fspath(path)
    prompts = read_prompts(path, split)[first:]
    where = f"in {path}" if split is None else f"in split {split!r} of {path}"
    if not prompts:
        raise ValueError(f"No prompts left {where} after skipping {first}; lower --first-prompt.")
    if count is not None and count > len(prompts):
        after = f" after --first-prompt {first}" if first else ""
        raise ValueError(
            f"--num-prompts {count} is more than the {len(prompts)} prompts {where}"
            f"{after}; pass --num-prompts {len(prompts)} or fewer, or leave it out to use all."
        )
    return prompts[:count]
