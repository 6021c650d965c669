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


# --------------------------------------------------------------------------- options that take several values


def _leaf_commands():
    import typer

    from lessctl.cli import _register, app
    from lessctl.commands._options import leaf_commands

    _register()
    return leaf_commands(typer.main.get_command(app))


def test_readme_lists_every_multi_value_option():
    """README's list of options that take several values is what the commands declare (list-typed options)."""
    from lessctl.commands._options import multi_value_options, takes_bare_words

    declared = {path: set(multi_value_options(c)) for path, c in _leaf_commands().items()}
    declared = {path: opts for path, opts in declared.items() if opts}
    text = (Path(__file__).parent.parent / "README.md").read_text()
    paragraph = text.split("Options that take several values", 1)[1].split("\n\n", 1)[0]
    listed = {
        m.group(1).strip(): set(m.group(2).split())
        for m in re.finditer(r"`((?:[a-z]+ )+)(--[a-z-]+(?: --[a-z-]+)*)`", paragraph)
    }
    assert listed == declared
    assert {"grads", "match", "eval", "run"} <= set(declared)
    # a bare word after such an option's values would be ambiguous on a command with positional arguments
    assert not [p for p in declared if takes_bare_words(_leaf_commands()[p])]


def test_several_values_after_one_option(tiny_ws, cli):
    cfg = ("--config", tiny_ws / CONFIG_NAME)
    r = cli(*cfg, "match", "--target", "arithmetic", "sorting", "--method", "random", "bm25", "--json")
    assert r.code == 0, r
    pairs = [(s["target"], s["method"]) for s in json.loads(r.out)["selections"]]
    assert pairs == [("arithmetic", "random"), ("arithmetic", "bm25"), ("sorting", "random"), ("sorting", "bm25")]
    # the two spellings are the same; `--opt=a b` too
    r = cli(*cfg, "match", "--target=antonyms", "--method", "random", "--train", "synth_b", "--json")
    assert r.code == 0, r
    assert set(json.loads(r.out)["selections"][0]["by_train_set"]) == {"synth_b"}
    for train in (["synth_a", "synth_b"], ["synth_a", "--train", "synth_b"]):
        r = cli(*cfg, "match", "--target", "antonyms", "--method", "random", "--train", train[0], *train[1:], "--force",
                "--json")  # fmt: skip
        assert r.code == 0, r
        assert set(json.loads(r.out)["selections"][0]["by_train_set"]) == {"synth_a", "synth_b"}
    # run: several methods and several items
    r = cli(*cfg, "run", "--dry-run", "--until", "match", "--methods", "random", "bm25", "--json")
    assert r.code == 0, r
    keys = {j["key"] for j in json.loads(r.out)["jobs"]}
    assert {"match sorting/random", "match sorting/bm25"} <= keys and not any("/less" in k for k in keys)
    r = cli(*cfg, "run", "--dry-run", "--methods", "random", "bm25", "--items", "match sorting/bm25",
            "match antonyms/bm25", "--json")  # fmt: skip
    assert r.code == 0, r
    assert {j["key"] for j in json.loads(r.out)["jobs"]} == {"match sorting/bm25", "match antonyms/bm25"}
    # eval and results read every task given after one --task
    assert_user_error(cli(*cfg, "eval", "--task", "mmlu", "nope"), "--task", "'nope'")
    assert_user_error(cli(*cfg, "results", "--task", "mmlu", "bbh"), "--task", "'mmlu', 'bbh'")


def test_grads_takes_several_checkpoints_dims_and_targets(tiny_ws, cli):
    cfg = ("--config", tiny_ws / CONFIG_NAME)
    steps = [str(c["step"]) for c in json.loads((tiny_ws / "out" / "warmup" / "checkpoints.json").read_text())]
    assert len(steps) == 2
    r = cli(*cfg, "grads", "--ckpt", *steps, "--dims", "64", "128", "--target", "arithmetic", "sorting",
            "--projector", "basic", "--device", "cpu", "--json")  # fmt: skip
    assert r.code == 0, r
    stores = json.loads(r.out)["stores"]
    assert {(s["name"], str(s["step"])) for s in stores} == {(t, s) for t in ("arithmetic", "sorting") for s in steps}
    r = cli(*cfg, "store", "ls", "--json")
    assert r.code == 0, r
    assert {tuple(s["dims"]) for s in json.loads(r.out)["stores"]} == {(64, 128)}
    # store verify's paths are positional arguments: several, none mistaken for an option's value
    paths = [s["store"] for s in stores]
    r = cli(*cfg, "store", "verify", *paths, "--json")
    assert r.code == 0, r
    assert set(json.loads(r.out)["stores"]) == set(paths)
    # a negative number is a value, not an option
    assert_user_error(cli(*cfg, "grads", "--ckpt", steps[0], "-5", "--json"), "--ckpt: no checkpoint -5")


@pytest.mark.parametrize(
    "args, option, values, command",
    [
        (["finetune", "--target", "mmlu", "bbh"], "--target", "'mmlu', 'bbh'", "lessctl finetune"),
        (["finetune", "--target", "sorting", "--method", "less", "bm25"], "--method", "'less', 'bm25'", "finetune"),
        (["ablate", "--target", "mmlu", "bbh", "--finetune"], "--target", "'mmlu', 'bbh'", "lessctl ablate"),
        (["eval", "--task", "mmlu", "--model", "a", "b"], "--model", "'a', 'b'", "lessctl eval"),
        (["match", "--target", "sorting", "--percentage", "0.1", "-0.2"], "--percentage", "'0.1', '-0.2'", "match"),
        (["grads", "--ckpt-index=1", "2"], "--ckpt-index", "'1', '2'", "lessctl grads"),
        (["slurm", "render", "finetune", "--target", "mmlu", "tydiqa"], "--target", "'mmlu', 'tydiqa'", "finetune"),
    ],
    ids=["finetune-target", "finetune-method", "ablate-target", "eval-model", "negative", "equals", "slurm-render"],
)
def test_a_single_valued_option_refuses_several(tiny_ws, cli, args, option, values, command):
    line = assert_user_error(cli("--config", tiny_ws / CONFIG_NAME, *args), f"{option}: takes one value, got {values}")
    assert f"{command} takes one {option}" in line
    assert not (tiny_ws / "out" / "finetune").exists() and not (tiny_ws / "out" / "ablate").exists()


def test_double_dash_ends_the_values(tiny_ws, cli):
    cfg = ("--config", tiny_ws / CONFIG_NAME)
    r = cli(*cfg, "match", "--method", "random", "--target", "sorting", "--", "antonyms")
    assert r.code == 2 and "antonyms" in r.err and "takes one value" not in r.err, r
    assert not (tiny_ws / "out" / "selected").exists()
    r = cli(*cfg, "finetune", "--target", "mmlu", "bbh", "--help")  # help wins, as it does for any bad option
    assert r.code == 0 and "--target" in r.out, r
    # slurm render passes the stage's options on as given; the job's lessctl reads them
    r = cli(*cfg, "slurm", "render", "grads", "--ckpt", "105", "106", "--dims", "64", "128", "--time", "1:00:00")
    assert r.code == 0, r
    assert re.search(r" grads --ckpt 105 106 --dims 64 128\n", r.out), r.out
    assert "#SBATCH --time=1:00:00" in r.out
