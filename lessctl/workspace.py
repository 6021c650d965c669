"""Creating workspaces: `lessctl init --preset ...` writes lessctl.toml (and, for tiny, its model and data)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lessctl.config import CONFIG_NAME, build_config, to_toml
from lessctl.errors import AlreadyExistsError, ConfigError
from lessctl.files import write_atomic
from lessctl.vocab import EXTRA_PRESETS, PRESETS

_HUB = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
}
LESS_TRAIN = {  # LESS's four training sets in its data layout
    "flan_v2": "train/processed/flan_v2/flan_v2_data.jsonl",
    "cot": "train/processed/cot/cot_data.jsonl",
    "dolly": "train/processed/dolly/dolly_data.jsonl",
    "oasst1": "train/processed/oasst1/oasst1_data.jsonl",
}
# Examples per optimizer step in the paper's runs (4 GPUs x 1 x 32): the paper presets keep it on any number of
# devices, the accumulation being derived from the world size.
PAPER_BATCH = 128
# The tiny presets shrink the sizes for a CPU demo, not the semantics: LESS's seeds (42 for the subset, the
# Trainer's 0 for the LoRA, dropout and the data order), its example-weighted loss and its step stream. Their
# pools hold far fewer than 128 examples, so their steps are batch_size x gradient_accumulation_steps x devices.
_TINY_TRAINING = {
    "sample_data_seed": 42,
    "seed": 0,
    "loss_weighting": "example",
    "step_stream": "less",
    "effective_batch_size": 0,
}
# Presets outside PRESETS because they need more than a name (tiny-ir: a folder of BEIR collections).


def preset_config(preset: str, data_dir: str = "data") -> dict[str, Any]:
    """The workspace file's content for a preset (the paper's hyper-parameters for real models)."""
    if preset not in PRESETS + EXTRA_PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r} (choose from {', '.join(PRESETS + EXTRA_PRESETS)})")
    if preset == "tiny-ir":
        return _tiny_ir_config(data_dir)
    if preset == "tiny":
        return {
            "experiment": {"name": "tiny", "output_dir": "out", "seed": 3},
            "model": {"name_or_path": "model", "dtype": "auto", "max_seq_length": 128, "chat_format": "tulu"},
            "lora": {"r": 8, "alpha": 32, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "data": {
                "train": {"synth_a": "data/synth_a.jsonl", "synth_b": "data/synth_b.jsonl"},
                "targets": {
                    f: {"file": f"data/{f}_target.jsonl", "eval_file": f"data/{f}_eval.jsonl"}
                    for f in ("arithmetic", "antonyms", "sorting")
                },
                "data_dir": data_dir,
            },
            "warmup": {
                "percentage": 0.5,
                "epochs": 4,
                "learning_rate": 2e-3,
                "warmup_ratio": 0.03,
                "batch_size": 4,
                "gradient_accumulation_steps": 2,
                **_TINY_TRAINING,
            },
            "grads": {"dims": [128], "projector": "auto", "batch_tokens": 4096},
            "select": {"percentage": 0.05, "method": "less"},
            # enough passes over the 18 selected examples for the tiny model to learn a family's answer format
            "finetune": {
                "epochs": 30,
                "learning_rate": 1e-2,
                "batch_size": 4,
                "gradient_accumulation_steps": 1,
                **_TINY_TRAINING,
            },
        }
    return {
        "experiment": {"name": preset, "output_dir": "out", "seed": 3},
        "model": {"name_or_path": _HUB[preset], "dtype": "auto", "max_seq_length": 2048, "chat_format": "tulu"},
        "lora": {"r": 128, "alpha": 512, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {
            "train": {k: f"{data_dir}/{v}" for k, v in LESS_TRAIN.items()},
            "targets": {"mmlu": "mmlu", "bbh": "bbh", "tydiqa": "tydiqa"},
            "data_dir": data_dir,
        },
        "warmup": {
            "percentage": 0.05,
            "epochs": 4,
            "learning_rate": 2e-5,
            "warmup_ratio": 0.03,
            "batch_size": 1,
            "gradient_accumulation_steps": 32,
            "effective_batch_size": PAPER_BATCH,
            "step_stream": "less",
            "sample_data_seed": 42,
            "seed": 0,
        },
        "grads": {"dims": [8192], "projector": "auto", "batch_tokens": 16384},
        "select": {"percentage": 0.05, "method": "less"},
        "finetune": {
            "epochs": 4,
            "learning_rate": 2e-5,
            "batch_size": 1,
            "gradient_accumulation_steps": 32,
            "effective_batch_size": PAPER_BATCH,
            "step_stream": "less",
            "seed": 0,
        },
    }


def _tiny_ir_config(beir_root: str) -> dict[str, Any]:
    """LESS for listwise reranking on the tiny model: the msmarco* collection of `beir_root` as the pool,
    every other collection's dev file as a target and its eval file as the target's held-out evaluation (NDCG@5,
    as `lessctl ir eval` scores it; files written by init_workspace into data/)."""
    from lessctl.ir.tiny import TINY_IR_MAX_SEQ_LENGTH, tiny_ir_layout

    (pool, _), targets = tiny_ir_layout(beir_root)
    return {
        "experiment": {"name": "tiny-ir", "output_dir": "out", "seed": 3},
        "model": {
            "name_or_path": "model",
            "dtype": "auto",
            "max_seq_length": TINY_IR_MAX_SEQ_LENGTH,
            "chat_format": "tulu",
        },
        "lora": {"r": 8, "alpha": 32, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {
            "train": {pool: f"data/{pool}_data.jsonl"},
            "targets": {
                name: {"file": f"data/{name}_dev.jsonl", "eval_file": f"data/{name}_eval.jsonl"} for name, _ in targets
            },
            "data_dir": "data",
        },
        "warmup": {
            "percentage": 0.5,
            "epochs": 4,
            "learning_rate": 2e-3,
            "warmup_ratio": 0.03,
            "batch_size": 4,
            "gradient_accumulation_steps": 2,
            **_TINY_TRAINING,
        },
        "grads": {"dims": [128], "projector": "auto", "batch_tokens": 8192},
        "select": {"percentage": 0.25, "method": "less"},  # a quarter of a ~40-example pool: ~10 examples
        "finetune": {
            "epochs": 4,
            "learning_rate": 2e-3,
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            **_TINY_TRAINING,
        },
    }


HEADER = """\
# lessctl workspace ({preset} preset). Every value can be overridden by a command's options.
# Start with:  lessctl warmup && lessctl grads && lessctl match --target {target}
# `lessctl config show --docs` explains each key.

"""


def init_workspace(folder: Path, preset: str, *, data_dir: str = "data", force: bool = False) -> Path:
    """Writes `folder/lessctl.toml` for the preset; the tiny presets also build their data and model.

    `force` replaces lessctl.toml only: a tiny preset's data files and model already in the folder are kept
    (the preset's are built aside and only the missing ones moved in), so edited data are never overwritten.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--dir: {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_NAME
    if path.exists() and not force:
        raise AlreadyExistsError(f"{path} exists; pass --force to overwrite it")
    raw = preset_config(preset, data_dir)
    build_config(raw, path=path)  # a preset must always validate
    if preset in ("tiny", "tiny-ir") and not ((folder / "data").is_dir() and (folder / "model").is_dir()):
        _build_missing(folder, preset, data_dir)
    target = next(iter(raw["data"]["targets"]))
    write_atomic(path, HEADER.format(preset=preset, target=target) + to_toml(raw))
    return path


def _build_missing(folder: Path, preset: str, data_dir: str) -> None:
    """Builds a tiny preset's data and model in a folder aside, then moves in what `folder` lacks."""
    aside = folder / ".lessctl-init.new"
    shutil.rmtree(aside, ignore_errors=True)
    try:
        if preset == "tiny":
            from lessctl.tiny import build_tiny_model, corpus_texts, write_tiny_data

            files = write_tiny_data(aside / "data")
            texts = corpus_texts(list(files["train"].values()) + list(files["targets"].values()))
            build_tiny_model(aside / "model", texts)
        else:
            from lessctl.ir.tiny import build_tiny_ir_workspace

            build_tiny_ir_workspace(aside, data_dir)
        if not (folder / "model").exists():
            os.replace(aside / "model", folder / "model")
        (folder / "data").mkdir(exist_ok=True)
        for f in sorted((aside / "data").rglob("*")):
            dst = folder / "data" / f.relative_to(aside / "data")
            if f.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            elif not dst.exists():
                os.replace(f, dst)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
