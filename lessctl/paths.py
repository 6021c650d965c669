"""The output folder's layout (ARCHITECTURE.md, a contract): every path under `[experiment] output_dir`.

<output_dir>/
  warmup/checkpoint-<step>/            adapter, optimizer state, trainer state
  warmup/checkpoints.json              [{"step", "epoch", "lr_mean"}]: the matching weights
  grads/<name>-ckpt<step>-<type>.h5    one store per data set, checkpoint and gradient type
  selected/<target>/<method>/          sorted.csv, top_p<pct>.jsonl, summary.json
  finetune/<target>-<method>/          adapter
  eval/<model>/<task>.json
  results.jsonl                        one line per evaluation
  slurm/                               scripts/, logs/, jobs.json
"""

from __future__ import annotations

import os
from pathlib import Path

Folder = str | os.PathLike

CHECKPOINTS_FILE = "checkpoints.json"
RESULTS_FILE = "results.jsonl"


def warmup_dir(output_dir: Folder) -> Path:
    return Path(output_dir) / "warmup"


def checkpoints_file(output_dir: Folder) -> Path:
    """The warmup's manifest: its checkpoints' steps, epochs and mean learning rates."""
    return warmup_dir(output_dir) / CHECKPOINTS_FILE


def checkpoint_dir(output_dir: Folder, step: int) -> Path:
    return warmup_dir(output_dir) / f"checkpoint-{step}"


def grads_dir(output_dir: Folder) -> Path:
    return Path(output_dir) / "grads"


def selected_dir(output_dir: Folder, target: str) -> Path:
    """Every selection for one target (one folder per method, and the ablation's files)."""
    return Path(output_dir) / "selected" / target


def selection_dir(output_dir: Folder, target: str, method: str) -> Path:
    return selected_dir(output_dir, target) / method


def full_pool_file(output_dir: Folder) -> Path:
    """Every example of the pool in one jsonl: what the study's full-pool finetune trains on."""
    return Path(output_dir) / "pool" / "full.jsonl"


def finetune_root(output_dir: Folder) -> Path:
    return Path(output_dir) / "finetune"


def finetune_dir(output_dir: Folder, name: str) -> Path:
    """The adapter trained on one selection; `name` is `<target>-<method>` for selections of `match`."""
    return finetune_root(output_dir) / name


def eval_json(output_dir: Folder, model_name: str, task: str) -> Path:
    return Path(output_dir) / "eval" / model_name / f"{task}.json"


def results_file(output_dir: Folder) -> Path:
    return Path(output_dir) / RESULTS_FILE


def slurm_dir(output_dir: Folder) -> Path:
    """Job logs, submitted scripts and jobs.json."""
    return Path(output_dir) / "slurm"
