"""The evaluation outputs on disk: `eval/<model>/<task>.json` and the `results.jsonl` log of every evaluation."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lessctl.errors import MissingArtifactError

RESULTS_FILE = "results.jsonl"


def results_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / RESULTS_FILE


def eval_json_path(output_dir: str | os.PathLike, model_name: str, task: str) -> Path:
    return Path(output_dir) / "eval" / model_name / f"{task}.json"


def write_eval_json(output_dir: str | os.PathLike, model_name: str, task: str, result: dict) -> Path:
    """Writes one evaluation's result (through a `.part` file, so readers never see half of it)."""
    path = eval_json_path(output_dir, model_name, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_eval_json(output_dir: str | os.PathLike, model_name: str, task: str) -> dict:
    path = eval_json_path(output_dir, model_name, task)
    if not path.is_file():
        raise MissingArtifactError(f"no evaluation at {path}; run `lessctl eval --task {task}` first")
    return json.loads(path.read_text(encoding="utf-8"))


def append_result(output_dir: str | os.PathLike, record: dict) -> Path:
    """Appends one evaluation record as a line of `<output_dir>/results.jsonl`."""
    path = results_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False, default=str)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    return path


def read_results(output_dir: str | os.PathLike) -> list[dict]:
    """Every record of `<output_dir>/results.jsonl`, oldest first ([] when there is none yet)."""
    path = results_path(output_dir)
    if not path.is_file():
        return []
    from lessctl.data import iter_json_lines

    return [rec for _, _, rec in iter_json_lines(path, "one evaluation record a line")]
