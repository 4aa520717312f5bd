"""The command-line adapter: flags from Configs, TOML overlay, messages, strict JSON,
progress lines, and how the `uhlm` entry point ends on errors and Ctrl-C."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import errno
import io
import json
import re
from typing import Literal

import numpy as np
import pytest

from analysis import cli
from calibration import collect, train_draft
from calibration.fit import LooUnit
from tests.helpers import write_synthetic_run
from uhlm_jax import cli_config, console

# A log line: "2025-01-01 12:00:00 desc: ...".
STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def _strict(text: str):
    """Parses JSON, raising on NaN and ±Infinity as strict parsers do."""

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


class Colour(enum.Enum):
    RED = "red"
    DARK_BLUE = "dark-blue"


@dataclasses.dataclass(frozen=True)
class Example:
    """A job's settings.

    Attributes:
        run_dir: where the run is.
        num_items: how many items to use,
            counted from the first.
        colour: the colour.
        low, high: the bounds.
        values: the grid.
        names: labels.
        size: an optional size.
        dtype: a dtype.
        verbose: talk more.
        chat: use a chat template.
    """

    run_dir: str
    num_items: int = 8
    colour: Colour = Colour.RED
    low: float = 0.0
    high: float = 1.0
    values: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    names: tuple[str, ...] = ()
    size: int | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    verbose: bool = False
    chat: bool = True

    def __post_init__(self):
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uhlm example")
    cli_config.add_arguments(parser, Example, cli_config.Flags(positional=("run_dir",)))
    return parser


def _config(argv: list[str]) -> Example:
    return cli_config.config_from_args(Example, _parser().parse_args(argv))


# ----------------------------------------------------------------------- flags and help


def test_field_docs_read_shared_entries_and_continuations():
    docs = cli_config.field_docs(Example)
    assert docs["num_items"] == "how many items to use, counted from the first."
    assert docs["low"] == docs["high"] == "the bounds."


def test_help_shows_field_docs_defaults_and_choices():
    text = " ".join(_parser().format_help().split())
    assert "how many items to use, counted from the first (default: 8)" in text
    assert "--colour {red,dark-blue}" in text and "(default: red)" in text
    assert "the grid (default: 0:1:5)" in text
    assert "--dtype {float32,bfloat16}" in text
    assert "--chat, --no-chat" in text
    assert "--config FILE" in text


def test_flags_parse_to_the_configs_types():
    cfg = _config(["r", "--num-items", "3", "--colour", "dark-blue", "--values", "0:1:3",
                   "--names", "a,b", "--size", "4", "--verbose", "--no-chat"])  # fmt: skip
    assert cfg == Example(run_dir="r", num_items=3, colour=Colour.DARK_BLUE,
                          values=(0.0, 0.5, 1.0), names=("a", "b"), size=4, verbose=True,
                          chat=False)  # fmt: skip
    assert _config(["r"]) == Example(run_dir="r")


def test_every_job_help_shows_defaults(capsys):
    for command in ("collect", "fit", "sweep", "report", "train-draft", "link"):
        assert cli.main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: " in text and "Config." not in text, command
    assert cli.main(["report", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "by default (None) the one evaluate and demo use: the first of thresholds.json's " \
        "Learn-then-Test, risk-bounded" in text


# ----------------------------------------------------------------------- TOML overlay


def test_toml_overlay_with_command_line_override(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text('num_items = 5\ncolour = "dark-blue"\nvalues = [0.1, 0.2]\nsize = 2\n')
    cfg = _config(["r", "--config", str(path), "--num-items", "7"])
    assert (cfg.num_items, cfg.colour, cfg.values, cfg.size) == (7, Colour.DARK_BLUE,
                                                                (0.1, 0.2), 2)


@pytest.mark.parametrize(
    "text, message",
    [
        ("num_itemz = 5\n", r"unknown key\(s\) 'num_itemz'; valid keys: run_dir, num_items"),
        ('colour = "green"\n', r"key 'colour': unknown value 'green'; use one of: red"),
        ('num_items = "many"\n', r"key 'num_items': 'many' is not an integer"),
        ("num_items = [1\n", r"is not valid TOML"),
    ],
)
def test_bad_toml_names_the_key(tmp_path, text, message):
    path = tmp_path / "settings.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        _config(["r", "--config", str(path)])


# ----------------------------------------------------------------------- messages


def test_config_errors_name_flags_not_fields():
    with pytest.raises(ValueError, match=r"^--num-items must be >= 1, got 0$"):
        _config(["r", "--num-items", "0"])
    with pytest.raises(ValueError, match=r"^--low=2.0 must be below --high=1.0$"):
        _config(["r", "--low", "2", "--high", "1"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["collect", "--out", "x", "--num-prompts", "0"], "--num-prompts must be >= 1"),
        (["collect", "--out", "x", "--dtype", "float8"],
         "argument --dtype: unknown value 'float8'; use one of: float32, bfloat16, float16"),
        (["sweep", "x", "--thresholds", "0:1:abc"],
         "argument --thresholds: '0:1:abc' is not a list of numbers"),
        (["rollout", "--mode", "uhml"], "argument --mode: unknown mode 'uhml'"),
    ],
)
def test_bad_values_are_one_line_naming_the_flag(argv, message, capsys):
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and message in err, err


# ----------------------------------------------------------------------- dtype


def test_dtype_flag_reaches_every_model_loading_config(tmp_path):
    parser = argparse.ArgumentParser()
    collect.add_arguments(parser)
    cfg = cli_config.config_from_args(
        collect.Config, parser.parse_args(["--out", "x", "--dtype", "bfloat16"])
    )
    assert cfg.dtype == "bfloat16" and cfg.settings()["dtype"] == "bfloat16"
    for module in ("run_mode", "generate", "demo", "evaluate", "sweep"):
        config = __import__(f"analysis.{module}", fromlist=["Config"]).Config
        assert "dtype" in {f.name for f in dataclasses.fields(config)}, module


def test_train_draft_cache_keys_include_the_dtype(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "split": "train"}\n')
    f32 = train_draft.Config(prompts=str(prompts), workdir=str(tmp_path))
    bf16 = dataclasses.replace(f32, dtype="bfloat16")
    assert train_draft.sequence_settings(bf16)["dtype"] == "bfloat16"
    assert train_draft.checkpoint_dir(f32) != train_draft.checkpoint_dir(bf16)


# ----------------------------------------------------------------------- strict JSON


@pytest.mark.parametrize(
    "argv",
    [
        ["link", "--json"],
        ["cache", "--json"],
        ["threshold", "--slope", "0.82", "--intercept", "-0.06", "--delta", "0.29", "--json"],
        ["rollout", "--pair", "toy", "--mode", "llm_only", "--max-new-tokens", "3", "--json"],
        ["generate", "--model", "toy-llm", "--prompt", "hi", "--no-chat",
         "--max-new-tokens", "3", "--json"],
    ],
)
def test_json_output_is_strict(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UHLM_CACHE_DIR", str(tmp_path))
    assert cli.main(argv) == 0
    _strict(capsys.readouterr().out)


def test_sweep_json_is_strict(tmp_path, capsys):
    write_synthetic_run(tmp_path)
    argv = ["sweep", str(tmp_path), "--thresholds", "0,0.5", "--snr-db", "", "--quiet", "--json"]
    assert cli.main(argv) == 0
    _strict(capsys.readouterr().out)


def test_undefined_acceptance_is_null_in_json_and_a_dash_in_text(capsys):
    argv = ["rollout", "--pair", "toy", "--mode", "llm_only", "--max-new-tokens", "3"]
    assert cli.main([*argv, "--json"]) == 0
    assert _strict(capsys.readouterr().out)["summary"]["acceptance_rate"] is None
    assert cli.main(argv) == 0
    assert "acceptance —," in capsys.readouterr().out


def test_json_text_and_number_show_undefined_values_one_way():
    obj = {"a": float("nan"), "b": [np.float32(np.inf), np.int64(3)], "c": np.arange(2)}
    assert _strict(console.json_text(obj)) == {"a": None, "b": [None, 3], "c": [0, 1]}
    assert [console.number(x) for x in (None, float("nan"), float("inf"), 0.5)] == [
        "—", "—", "∞", "0.500"
    ]


def test_json_text_writes_an_enum_member_as_its_value():
    assert _strict(console.json_text({"loo_unit": LooUnit.PROMPT})) == {"loo_unit": "prompt"}


# ----------------------------------------------------------------------- progress


def test_progress_in_a_log_is_one_timestamped_line_per_tenth():
    stream = io.StringIO()
    bar = console.progress(total=20, desc="collect", unit="batch", stream=stream)
    assert isinstance(bar, console.LogProgress)
    for _ in range(20):
        bar.set_postfix(tokens=7)
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert all(re.match(STAMP + r"collect: \d+/20 batch \(\d+%\), \d+:\d\d elapsed", line)
               for line in lines)
    assert "about" in lines[0] and "left" in lines[0] and "tokens=7" in lines[0]
    assert "20/20 batch (100%)" in lines[-1] and "left" not in lines[-1]


def test_short_progress_logs_every_step_and_quiet_logs_nothing():
    stream = io.StringIO()
    assert list(console.progress(range(3), desc="d", stream=stream)) == [0, 1, 2]
    assert len(stream.getvalue().splitlines()) == 3
    quiet = io.StringIO()
    assert list(console.progress(range(3), desc="d", stream=quiet, quiet=True)) == [0, 1, 2]
    assert quiet.getvalue() == ""


def test_progress_in_a_terminal_is_a_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = console.progress(total=2, desc="d", stream=Terminal())
    assert not isinstance(bar, console.LogProgress)
    bar.close()


# ----------------------------------------------------------------------- the entry point


def test_ctrl_c_prints_one_line_saying_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(collect, "run", interrupted)
    assert cli.main(["collect", "--pair", "toy", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "uhlm collect: interrupted; run the same command with --resume to continue " \
        "where it stopped"


def test_an_unwritable_folder_is_one_line(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "run" / "config.json")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(collect, "run", read_only)
    assert cli.main(["collect", "--pair", "toy", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err == (f"uhlm collect: error: cannot write {path}: Read-only file system; "
                   "choose a writable folder\n")
