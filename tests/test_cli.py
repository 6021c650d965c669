"""Tests for the command line: bad input is one `error:` line and exit 2 (no traceback); --help and --version."""

import json
import re
from pathlib import Path

import pytest

from lessctl import __version__
from lessctl.config import CONFIG_NAME

GOOD = json.dumps({"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]})


def assert_user_error(r, *fragments: str) -> str:
    """Exit 2, exactly one `error:` line on stderr naming the fragments, no traceback; returns the line."""
    assert r.code == 2, r
    lines = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r
    assert "Traceback" not in r.err and "Traceback" not in r.out, r
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def workspace(tmp_path: Path, model: str | Path, train: dict[str, str]) -> Path:
    """A workspace file pointing at `model` and the given training files (output inside tmp_path)."""
    table = ", ".join(f'{k} = "{v}"' for k, v in train.items())
    p = tmp_path / CONFIG_NAME
    p.write_text(
        f'[model]\nname_or_path = "{model}"\nmax_seq_length = 64\n\n'
        f"[data]\ntrain = {{{table}}}\n\n"
        "[warmup]\npercentage = 1.0\nepochs = 1\nbatch_size = 2\ngradient_accumulation_steps = 1\n"
    )
    return p


@pytest.fixture(scope="module")
def tiny_model(tiny_template) -> Path:
    return tiny_template / "model"


BAD_LINES = [
    ('{"messages": [{"role": "user", "content": "hi"}, ', "invalid JSON"),
    ('{"id": "x1", "text": "no messages here"}', "expected 'messages' or 'prompt' and 'completion'"),
    (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}',
        "messages[1] has unknown role 'robot'",
    ),
    ('{"messages": []}', "'messages' must be a non-empty list"),
]


@pytest.mark.parametrize(
    "bad, message", BAD_LINES, ids=["malformed-json", "no-messages", "unknown-role", "empty-messages"]
)
def test_bad_training_line_names_file_and_line(tmp_path, cli, tiny_model, bad, message):
    f = tmp_path / "pool.jsonl"
    f.write_text(f"{GOOD}\n{GOOD}\n\n{GOOD}\n{bad}\n{GOOD}\n")  # line 5, counting the blank one
    cfg = workspace(tmp_path, tiny_model, {"pool": "pool.jsonl"})
    r = cli("--config", cfg, "warmup", "--device", "cpu")
    line = assert_user_error(r, f"{f}:5:", message)
    assert line.startswith(f"error: {f}:5: ")
    assert not (tmp_path / "out" / "warmup" / "checkpoints.json").exists()


def test_bad_line_in_the_second_file(tmp_path, cli, tiny_model):
    (tmp_path / "a.jsonl").write_text(GOOD + "\n")
    (tmp_path / "b.jsonl").write_text(f"{GOOD}\n{{oops\n")
    cfg = workspace(tmp_path, tiny_model, {"a": "a.jsonl", "b": "b.jsonl"})
    assert_user_error(cli("--config", cfg, "warmup", "--device", "cpu"), f"{tmp_path / 'b.jsonl'}:2:", "invalid JSON")


def test_missing_training_file(tmp_path, cli, tiny_model):
    cfg = workspace(tmp_path, tiny_model, {"pool": "nope.jsonl"})
    assert_user_error(
        cli("--config", cfg, "warmup", "--device", "cpu"), str(tmp_path / "nope.jsonl"), "no such data file"
    )


def test_missing_workspace_file(tmp_path, cli):
    missing = tmp_path / "nowhere" / CONFIG_NAME
    assert_user_error(cli("--config", missing, "config", "show"), str(missing), "lessctl init")


def test_no_workspace_file_found(tmp_path, cli):
    assert_user_error(cli("config", "show", cwd=tmp_path), f"no {CONFIG_NAME} in {tmp_path}", "lessctl init")


def test_unknown_config_key(tmp_path, cli):
    p = tmp_path / CONFIG_NAME
    p.write_text("[warmup]\nepochs = 2\nlearing_rate = 1e-4\n")
    assert_user_error(
        cli("--config", p, "config", "show"), str(p), "warmup.learing_rate", "did you mean 'learning_rate'?"
    )


def test_invalid_toml(tmp_path, cli):
    p = tmp_path / CONFIG_NAME
    p.write_text("[warmup\nepochs = 2\n")
    assert_user_error(cli("--config", p, "config", "show"), str(p), "invalid TOML")


@pytest.mark.parametrize("model", ["{tmp}/no_such_model", "no-such-org/no-such-model"])
def test_warmup_with_a_model_that_does_not_exist(tmp_path, cli, tiny_template, model):
    model = model.format(tmp=tmp_path)
    cfg = workspace(tmp_path, model, {"synth_a": str(tiny_template / "data" / "synth_a.jsonl")})
    assert_user_error(cli("--config", cfg, "warmup", "--device", "cpu"), repr(model), "name_or_path")


def test_empty_training_pool(tmp_path, cli, tiny_model):
    p = tmp_path / CONFIG_NAME
    p.write_text(f'[model]\nname_or_path = "{tiny_model}"\n')
    assert_user_error(cli("--config", p, "warmup"), "[data] train is empty")


def test_debug_shows_the_traceback(tmp_path, cli):
    from lessctl.errors import ConfigError

    with pytest.raises(ConfigError):
        cli("--debug", "--config", tmp_path / "missing.toml", "config", "show")


# --------------------------------------------------------------------------- help and version


def test_help_lists_every_command_with_one_line(cli, monkeypatch):
    from lessctl.cli import app

    monkeypatch.setenv("COLUMNS", "250")  # no wrapping: a description that needs two lines would show
    r = cli("--help")
    assert r.code == 0, r
    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert {"init", "config", "warmup", "finetune", "grads", "match"} <= names
    rows = {}
    for line in r.out.split("Commands", 1)[1].splitlines():
        m = re.match(r"^\W*(\w+)\s{2,}(\S.*?)\s*\W?$", line)
        if m and m.group(1) in names:
            rows.setdefault(m.group(1), []).append(m.group(2))
    assert set(rows) == names, r.out
    for name, descs in rows.items():
        assert len(descs) == 1, (name, descs)
        assert len(descs[0]) > 10, (name, descs)


def test_commands_help_is_the_docstring_summary():
    from lessctl.cli import _register, app

    _register()
    for c in app.registered_commands:
        summary = (c.callback.__doc__ or "").strip().splitlines()[0]
        assert summary.endswith(".") and 10 < len(summary) <= 120, c.name
    for g in app.registered_groups:
        assert g.help or g.typer_instance.info.help, g.name


def test_version(cli):
    r = cli("--version")
    assert r.code == 0, r
    assert r.out.strip() == f"lessctl {__version__}"


def test_no_arguments_shows_help(cli):
    r = cli()
    assert "Usage: lessctl" in r.out + r.err


def test_unknown_command_is_a_usage_error(cli):
    r = cli("warmpu")
    assert r.code == 2, r
    assert "Traceback" not in r.err


def test_main_registers_commands_once(cli):
    from lessctl.cli import app

    cli("--version")
    n = (len(app.registered_commands), len(app.registered_groups))
    cli("--version")
    assert (len(app.registered_commands), len(app.registered_groups)) == n
    names = [c.name for c in app.registered_commands]
    assert len(names) == len(set(names))


def test_flags_show_no_value_placeholder(cli):
    """Options that take no value look like flags in --help: no `<bool>` after them (Typer's own --help aside)."""
    import re

    from lessctl.cli import _register, app

    _register()
    commands = [[c.name] for c in app.registered_commands]
    for g in app.registered_groups:
        commands += [[g.name]] + [[g.name, c.name] for c in g.typer_instance.registered_commands]
    assert ["slurm", "render"] in commands and ["store", "verify"] in commands
    for args in [["--help"]] + [[*names, "--help"] for names in commands]:
        r = cli(*args)
        assert r.code == 0, (args, r)
        flagged = [
            ln
            for ln in r.out.splitlines()
            if "<bool>" in ln and not re.search(r"--(help|install-completion|show-completion)\b", ln)
        ]
        assert not flagged, (args, flagged)
