"""Prompt files: both formats, and clear errors for bad files."""

import json

import pytest

from calibration.prompts import Prompt, embedded_prompts_path, read_prompts, select_prompts


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_plain_and_alpaca_records(tmp_path):
    path = _write(
        tmp_path / "p.jsonl",
        [
            json.dumps({"prompt": "Hi there"}),
            "",
            json.dumps({"instruction": "Translate", "input": "chat", "output": "cat"}),
            json.dumps({"instruction": "Name a colour", "output": "red"}),
            json.dumps({"prompt": "Capital of Peru?", "reference": "Lima.", "answer": "Lima"}),
            json.dumps({"instruction": "Name a fruit", "output": "apple", "answer": "apple"}),
        ],
    )
    assert read_prompts(path) == [
        Prompt("Hi there", ""),
        Prompt("Translate\n\nchat", "cat"),
        Prompt("Name a colour", "red"),
        Prompt("Capital of Peru?", "Lima.", answer="Lima"),
        Prompt("Name a fruit", "apple"),
    ]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "contains no prompts"),
        (["{not json"], "line 1: not valid JSON"),
        ([json.dumps({"text": "x"})], "needs a 'prompt' key"),
        (
            [json.dumps({"prompt": "ok"}), json.dumps({"prompt": "  "})],
            "line 2: the prompt is empty",
        ),
        ([json.dumps(["a"])], "expected a JSON object"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, lines, message):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Prompt file not found"):
        read_prompts(tmp_path / "nope.jsonl")


def test_split_filter_and_shipped_prompts(tmp_path):
    path = _write(
        tmp_path / "s.jsonl",
        [
            json.dumps({"prompt": "a", "split": "train"}),
            json.dumps({"prompt": "b", "split": "eval"}),
        ],
    )
    assert [p.text for p in read_prompts(path, split="eval")] == ["b"]
    with pytest.raises(ValueError, match=r"no prompts in split 'test'; its splits are \['eval'"):
        read_prompts(path, split="test")
    shipped = read_prompts(embedded_prompts_path())
    assert len(shipped) == 513 and all(p.reference for p in shipped)
    sizes = {s: sum(p.split == s for p in shipped) for s in ("train", "calibration", "evaluation")}
    assert sizes == {"train": 108, "calibration": 259, "evaluation": 146}
    assert len({p.text for p in shipped}) == len(shipped)
    answered = [p for p in shipped if p.answer]
    assert 2 * len(answered) >= len(shipped)
    # Answers are digits where a reference spells a number out ("Six.").
    assert all(
        p.answer.isdigit() or p.answer.lower() in p.reference.lower().replace(",", "")
        for p in answered
    )


def test_select_prompts_skips_counts_and_never_cuts_silently(tmp_path):
    path = _write(tmp_path / "s.jsonl", [json.dumps({"prompt": c, "split": "x"}) for c in "abcd"])
    assert [p.text for p in select_prompts(path, "x", first=1, count=2)] == ["b", "c"]
    assert [p.text for p in select_prompts(path, "x", first=1)] == ["b", "c", "d"]
    with pytest.raises(ValueError, match=r"--num-prompts 4 is more than the 3 prompts in split "
                       r"'x' of .* after --first-prompt 1; pass --num-prompts 3 or fewer"):
        select_prompts(path, "x", first=1, count=4)
    with pytest.raises(ValueError, match="No prompts left .* after skipping 4; lower --first"):
        select_prompts(path, "x", first=4)
