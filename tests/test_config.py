"""Tests for the typed config: precedence, closest-key errors, all problems at once, presets, `init`, `config show`."""

import json
import tomllib
from pathlib import Path

import pytest

from lessctl.config import CONFIG_NAME, Config, build_config, describe_fields, load_config, to_toml
from lessctl.errors import AlreadyExistsError, ConfigError
from lessctl.workspace import PRESETS, init_workspace, preset_config

FILE = """\
[experiment]
name = "prec"

[model]
name_or_path = "my/model"

[warmup]
epochs = 4
learning_rate = 0.002
percentage = 1

[data]
train = {dolly = "data/dolly.jsonl"}
targets = {mmlu = "mmlu", mine = {file = "t.jsonl"}}
"""


@pytest.fixture
def ws(tmp_path) -> Path:
    p = tmp_path / CONFIG_NAME
    p.write_text(FILE)
    return p


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / CONFIG_NAME
    p.write_text(text)
    return p


def config_error(tmp_path: Path, text: str, overrides=None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text), overrides)
    return str(exc.value)


# --------------------------------------------------------------------------- precedence


def test_defaults_file_overrides(ws):
    defaults = Config()
    cfg = load_config(ws, {"warmup.epochs": 7, "warmup.learning_rate": None, "model.max_seq_length": 512})
    assert cfg.warmup.epochs == 7  # override beats the file's 4
    assert cfg.warmup.learning_rate == 0.002  # None: option not given, the file's value stays
    assert cfg.model.max_seq_length == 512  # override beats the default
    assert cfg.model.name_or_path == "my/model"  # file beats the default
    assert cfg.warmup.percentage == 1.0 and isinstance(cfg.warmup.percentage, float)  # int coerced
    assert cfg.warmup.warmup_ratio == defaults.warmup.warmup_ratio == 0.03  # not in the file: default
    assert cfg.lora == defaults.lora and cfg.grads == defaults.grads
    assert cfg.finetune.percentage == 1.0 and cfg.finetune.epochs == 4  # its own section's defaults
    assert load_config(ws).warmup.epochs == 4


def test_paths_resolve_against_the_workspace(ws):
    cfg = load_config(ws)
    assert cfg.path == ws.resolve()
    assert cfg.train_files() == {"dolly": ws.parent.resolve() / "data" / "dolly.jsonl"}
    assert cfg.output_dir == ws.parent.resolve() / "out"


def test_no_file_uses_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(None, {"warmup.epochs": 2}, required=False).warmup.epochs == 2
    with pytest.raises(ConfigError, match="lessctl init"):
        load_config(None)


def test_config_show_json_through_the_cli(ws, cli):
    r = cli("--config", ws, "config", "show", "--json")
    assert r.code == 0, r
    shown = json.loads(r.out)
    assert shown["path"] == str(ws.resolve())
    assert shown["warmup"]["epochs"] == 4 and shown["warmup"]["learning_rate"] == 0.002
    assert shown["model"]["name_or_path"] == "my/model"
    assert shown["model"]["max_seq_length"] == 2048  # default
    assert shown["data"]["targets"]["mine"] == {"file": "t.jsonl"}
    assert {k: v for k, v in shown.items() if k != "path"} == load_config(ws).to_dict()


def test_config_show_finds_the_file_in_a_parent(ws, cli):
    sub = ws.parent / "a" / "b"
    sub.mkdir(parents=True)
    r = cli("config", "show", "--json", cwd=sub)
    assert r.code == 0, r
    assert json.loads(r.out)["path"] == str(ws.resolve())


def test_config_show_toml_round_trips(ws, cli):
    r = cli("--config", ws, "config", "show")
    assert r.code == 0, r
    assert build_config(tomllib.loads(r.out)) == load_config(ws)


def test_cli_options_override_the_file(ws, cli):
    # `warmup --percentage` goes through the config: an out-of-range value is refused before any work.
    r = cli("--config", ws, "warmup", "--percentage", "2", "--epochs", "0")
    assert r.code == 2, r
    assert "warmup.percentage: must be in (0, 1], got 2.0" in r.err
    assert "warmup.epochs: must be at least 1" in r.err


# --------------------------------------------------------------------------- errors


def test_unknown_key_names_the_closest(tmp_path):
    msg = config_error(tmp_path, "[warmup]\nepoch = 3\n")
    assert "unknown key warmup.epoch (did you mean 'epochs'?)" in msg
    assert str(tmp_path / CONFIG_NAME) in msg


def test_unknown_section_names_the_closest(tmp_path):
    assert "unknown section [warmpu] (did you mean 'warmup'?)" in config_error(tmp_path, "[warmpu]\nepochs = 3\n")


def test_unknown_key_without_a_close_match_lists_the_valid_ones(tmp_path):
    msg = config_error(tmp_path, "[select]\nzzzzzz = 1\n")
    assert "unknown key select.zzzzzz (valid: percentage, method)" in msg


def test_unknown_override_names_the_closest(ws):
    with pytest.raises(ConfigError, match=r"unknown key warmup.epoch \(did you mean 'epochs'\?\)"):
        load_config(ws, {"warmup.epoch": 3})
    with pytest.raises(ConfigError, match=r"warmpu.*did you mean 'warmup'"):
        load_config(ws, {"warmpu.epochs": 3})


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ('[warmup]\nepochs = "four"\n', "warmup.epochs", "expected an integer, got 'four'"),
        ("[warmup]\nepochs = 2.5\n", "warmup.epochs", "expected an integer, got 2.5"),
        ('[warmup]\nlearning_rate = "fast"\n', "warmup.learning_rate", "expected a number"),
        ("[warmup]\nlearning_rate = true\n", "warmup.learning_rate", "expected a number"),
        ("[model]\nname_or_path = 3\n", "model.name_or_path", "expected a string"),
        ('[lora]\ntarget_modules = "q_proj"\n', "lora.target_modules", "expected a list"),
        ("[data]\ntrain = 1\n", "data.train", "expected a table"),
        ("model = 1\n", "model", "expected a table [model]"),
    ],
)
def test_wrong_type_names_the_key(tmp_path, text, key, expected):
    msg = config_error(tmp_path, text)
    assert f"{key}: {expected}" in msg


@pytest.mark.parametrize(
    "text, expected",
    [
        ('[model]\nchat_format = "chatml"\n', "model.chat_format: expected tulu or llama2"),
        ("[model]\nmax_seq_length = 0\n", "model.max_seq_length: must be positive"),
        ("[finetune]\nwarmup_ratio = 1.5\n", "finetune.warmup_ratio: must be in [0, 1)"),
        ('[select]\nmethod = "best"\n', "select.method: expected less, random, bm25"),
        ("[grads]\ndims = [0]\n", "grads.dims: expected a list of positive integers"),
        ('[data]\ntargets = {x = "mmlo"}\n', "data.targets.x: unknown built-in target 'mmlo' (did you mean 'mmlu'?)"),
        ('[data]\ntargets = {x = {path = "a"}}\n', "data.targets.x: a custom target needs file"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, expected):
    assert expected in config_error(tmp_path, text)


def test_all_problems_reported_together(tmp_path):
    msg = config_error(
        tmp_path,
        '[warmpu]\nx = 1\n[warmup]\nepoch = 3\nlearning_rate = "x"\n[model]\nname_or_pth = "m"\n',
        {"grads.dimz": [8]},
    )
    for part in (
        "unknown section [warmpu]",
        "warmup.epoch (did you mean 'epochs'?)",
        "warmup.learning_rate: expected a number",
        "model.name_or_pth (did you mean 'name_or_path'?)",
        "grads.dimz (did you mean 'dims'?)",
    ):
        assert part in msg
    assert msg.count("; ") == 4


def test_value_problems_reported_together(tmp_path):
    msg = config_error(tmp_path, '[model]\nchat_format = "x"\ndtype = "fp8"\n[warmup]\nepochs = 0\npercentage = 0\n')
    assert all(k in msg for k in ("model.chat_format", "model.dtype", "warmup.epochs", "warmup.percentage"))


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[warmup\n"))
    with pytest.raises(ConfigError, match="no such workspace file; create one with `lessctl init`"):
        load_config(tmp_path / "missing.toml")


def test_every_field_has_a_doc():
    docs = describe_fields()
    assert set(docs) == set(Config().to_dict())
    for sec, fields in docs.items():
        for k, d in fields.items():
            assert d and "\n" not in d, f"{sec}.{k} lacks a one-line doc"


def test_config_show_docs(cli):
    r = cli("config", "show", "--docs")
    assert r.code == 0, r
    assert "[warmup]" in r.out.splitlines() and "percentage: Share of each training file used" in r.out
    assert "e.g. [slurm.stages.grads] time" in r.out  # brackets in docs are text, not rich markup


# --------------------------------------------------------------------------- presets and init


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_validates_and_round_trips(preset):
    raw = preset_config(preset)
    cfg = build_config(raw)
    assert build_config(tomllib.loads(to_toml(raw))) == cfg
    assert cfg.data.train and cfg.data.targets


def test_extra_presets_validate(data_dir):
    from lessctl import workspace

    for preset in getattr(workspace, "EXTRA_PRESETS", ()):  # presets that need a data folder (tiny-ir: BEIR)
        raw = preset_config(preset, str(data_dir / "beir"))
        cfg = build_config(raw)
        assert build_config(tomllib.loads(to_toml(raw))) == cfg
        assert cfg.data.train and cfg.data.targets


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "tiny"])
def test_init_real_presets_writes_a_valid_file(tmp_path, preset):
    path = init_workspace(tmp_path / "w", preset, data_dir="/data/less")
    text = path.read_text()
    assert text.startswith("# lessctl workspace") and "lessctl warmup" in text
    cfg = load_config(path)
    assert cfg.warmup.gradient_accumulation_steps == 32 and cfg.lora.r == 128 and cfg.lora.alpha == 512
    assert cfg.train_files()["dolly"] == Path("/data/less/train/processed/dolly/dolly_data.jsonl")
    assert set(cfg.data.targets) == {"mmlu", "bbh", "tydiqa"}


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'llama3'"):
        preset_config("llama3")


def test_init_refuses_to_overwrite(tmp_path, cli):
    d = tmp_path / "w"
    r = cli("init", "--preset", "llama2-7b", "--dir", d)
    assert r.code == 0, r
    path = d / CONFIG_NAME
    path.write_text(path.read_text() + "# my edits\n")
    r = cli("init", "--preset", "mistral-7b", "--dir", d)
    assert r.code == 2, r
    assert r.err.strip() == f"error: {path} exists; pass --force to overwrite it"
    assert path.read_text().endswith("# my edits\n")
    with pytest.raises(AlreadyExistsError):
        init_workspace(d, "llama2-13b")
    r = cli("init", "--preset", "mistral-7b", "--dir", d, "--force")
    assert r.code == 0, r
    assert "# my edits" not in path.read_text()
    assert load_config(path).model.name_or_path == "mistralai/Mistral-7B-v0.1"


def test_init_unknown_preset_through_the_cli(tmp_path, cli):
    r = cli("init", "--preset", "gpt5", "--dir", tmp_path)
    assert r.code == 2 and r.err.startswith("error: --preset: unknown preset 'gpt5'"), r
    assert not (tmp_path / CONFIG_NAME).exists()


def test_tiny_workspace_file_loads(tiny_template):
    cfg = load_config(tiny_template / CONFIG_NAME)
    assert cfg.model.name_or_path == "model" and cfg.warmup.epochs == 2
    assert all(p.is_file() for p in cfg.train_files().values())
    assert all(cfg.resolve(t["file"]).is_file() for t in cfg.data.targets.values())
