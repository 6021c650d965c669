"""The output folder's layout (ARCHITECTURE.md, a contract): every path and artifact name under the output folder.

Every other module gets names from here: no module builds or parses an artifact name itself
(tests/test_outputs.py greps for it).

<output_dir>/
  warmup/checkpoint-<step>/            adapter, optimizer state, trainer state
  warmup/checkpoints.json              [{"step", "epoch", "lr_mean"}]: the matching weights
  grads/<name>-ckpt<step>-<type>.h5    one store per data set, checkpoint and gradient type
  selected/<target>/<method>/          sorted.csv, top_p<pct>.jsonl, summary.json
  finetune/<target>-<method>/          adapter (random draws: random[-seed<s>]/, one per draw for every target)
  eval/<model>/<task>.json
  results.jsonl                        one line per evaluation
  slurm/                               scripts/, logs/, jobs.json
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from lessctl.vocab import FEATURE_TYPES

Folder = str | os.PathLike

CHECKPOINTS_FILE = "checkpoints.json"
RESULTS_FILE = "results.jsonl"
RUN_FILE = "lessctl_run.json"  # a warmup's or finetune's run record (settings, counts, provenance)
SUMMARY_FILE = "summary.json"  # a selection's record
SORTED_FILE = "sorted.csv"  # a selection's every pool row by score
STAGING_SUFFIX = ".new"  # a training run's folder while it trains (moved into place when complete)


def warmup_dir(output_dir: Folder) -> Path:
    return Path(output_dir) / "warmup"


def checkpoints_file(output_dir: Folder) -> Path:
    """The warmup's manifest: its checkpoints' steps, epochs and mean learning rates."""
    return warmup_dir(output_dir) / CHECKPOINTS_FILE


CHECKPOINT_PREFIX = "checkpoint-"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{int(step)}"


def checkpoint_dir(output_dir: Folder, step: int) -> Path:
    return warmup_dir(output_dir) / checkpoint_name(step)


def checkpoint_dir_in(run_dir: Folder, step: int) -> Path:
    """A checkpoint inside a training run's own folder (the warmup's, or its staging folder)."""
    return Path(run_dir) / checkpoint_name(step)


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    """The step of a `checkpoint-<step>` folder, None for any other name."""
    name = Path(folder).name
    rest = name[len(CHECKPOINT_PREFIX) :] if name.startswith(CHECKPOINT_PREFIX) else ""
    return int(rest) if rest.isdigit() else None


def seed_run_dir(output_dir: Folder, seed: int) -> Path:
    """The output folder of a further warmup run (`[study] warmup_seeds`)."""
    return Path(output_dir) / f"warmup-seed{seed}"


def is_seed_run_dir(output_dir: Folder, seed: int) -> bool:
    return Path(output_dir).name == f"warmup-seed{seed}"


def grads_dir(output_dir: Folder) -> Path:
    return Path(output_dir) / "grads"


def selected_dir(output_dir: Folder, target: str) -> Path:
    """Every selection for one target (one folder per method, and the ablation's files)."""
    return Path(output_dir) / "selected" / target


def selection_dir(output_dir: Folder, target: str, method: str) -> Path:
    return selected_dir(output_dir, target) / method


def selection_summary(output_dir: Folder, target: str, selection: str) -> Path:
    return selection_dir(output_dir, target, selection) / SUMMARY_FILE


def selection_file_name(percentage: float | None, max_samples: int | None, n: int) -> str:
    """The jsonl of a selection: `top_p0.05.jsonl`, or `top_n<k>.jsonl` for a fixed count."""
    return f"top_n{n}.jsonl" if max_samples is not None else f"top_p{percentage:g}.jsonl"


def full_pool_file(output_dir: Folder) -> Path:
    """Every example of the pool in one jsonl: what the study's full-pool finetune trains on."""
    return Path(output_dir) / "pool" / "full.jsonl"


def finetune_root(output_dir: Folder) -> Path:
    return Path(output_dir) / "finetune"


# ----------------------------------------------------------------------------- selection and model names


def random_selection(seed: int, workspace_seed: int) -> str:
    """The selection folder of one random draw: `random` for `[experiment] seed` (what `lessctl match` writes),
    `random-seed<s>` for the study's other draws."""
    return "random" if seed == workspace_seed else f"random-seed{seed}"


def subset_label(subset: Sequence[int]) -> str:
    """'12' for checkpoints 1 and 2; positions joined by '+' once any has two digits ('1+10')."""
    return ("+" if any(p > 9 for p in subset) else "").join(str(p) for p in subset)


def ablation_selection(subset: Sequence[int], method: str = "less") -> str:
    """The selection folder of a checkpoint subset: `less-ckpt14`."""
    return f"{method}-ckpt{subset_label(subset)}"


def finetune_name(target: str, selection: str) -> str:
    """The finetune folder of a target's selection: `<target>-<selection>`."""
    return f"{target}-{selection}"


def selection_model(target: str, selection: str, method: str) -> str:
    """The study's finetune folder for a selection: `<target>-<selection>`, except a random draw, which does not
    depend on the target: one model per draw (`random`, `random-seed<s>`), evaluated on every target."""
    return selection if method == "random" else finetune_name(target, selection)


def transfer_names(models: Sequence[str]) -> dict[str, str]:
    """Each transfer base model's short name, unique among `models`: the folder's name, with as many parent
    folders as it takes to tell two apart (`a/hf`, `b/hf` -> `a-hf`, `b-hf`); characters other than letters,
    digits, `.`, `_` and `-` become `_`."""

    def short(model: str, depth: int) -> str:
        parts = [p for p in Path(model).parts if p not in ("/", "\\", ".", "..")] or ["model"]
        return re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(parts[-depth:]))

    out: dict[str, str] = {}
    for m in dict.fromkeys(models):
        depth = 1
        while depth < 64 and any(short(o, depth) == short(m, depth) for o in models if o != m):
            depth += 1
        out[m] = short(m, depth)
    return out


def transfer_model(target: str, model: str, models: Sequence[str] = (), selection: str = "less") -> str:
    """The finetune folder of a target's selection trained on another base model (LESS-T):
    `<target>-<selection>-<model's short name>`, unique among the study's `models`."""
    return finetune_name(target, f"{selection}-{transfer_names([*models, model])[model]}")


def staging_dir(folder: Folder) -> Path:
    """Where a warmup or finetune is trained before it replaces `folder` (lessctl's own name beside it)."""
    return Path(folder).with_name(Path(folder).name + STAGING_SUFFIX)


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


# ----------------------------------------------------------------------------- gradient stores

_STORE_RE = re.compile(
    rf"^(?P<name>.+)-ckpt(?P<step>\d+)-(?P<type>{'|'.join(FEATURE_TYPES)})"
    r"(?:-shard(?P<k>\d+)of(?P<n>\d+))?\.h5(?:\.part)?$"
)


def format_store_name(name: str, step: int, grad_type: str, shard: tuple[int, int] | None = None) -> str:
    """The file name of a store: `<name>-ckpt<step>-<type>[-shard<K>of<N>].h5`."""
    if grad_type not in FEATURE_TYPES or not name or "/" in name or (shard and not 1 <= shard[0] <= shard[1]):
        raise ValueError(f"no store name for name={name!r}, grad_type={grad_type!r}, shard={shard!r}")
    return f"{name}-ckpt{int(step)}-{grad_type}" + (f"-shard{shard[0]}of{shard[1]}" if shard else "") + ".h5"


def parse_store_name(filename: str | os.PathLike) -> tuple[str, int, str, tuple[int, int] | None] | None:
    """(name, step, grad_type, (K, N) or None) from a store file name (`.part` allowed); None if not a store."""
    m = _STORE_RE.match(Path(filename).name)
    shard = (int(m["k"]), int(m["n"])) if m and m["k"] else None
    if m is None or (shard and not 1 <= shard[0] <= shard[1]):
        return None
    return m["name"], int(m["step"]), m["type"], shard
