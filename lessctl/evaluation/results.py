"""The evaluation outputs on disk: `eval/<model>/<task>.json` and the `results.jsonl` log of every evaluation."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lessctl.files import write_atomic
from lessctl.outputs import layout as paths


def results_path(output_dir: str | os.PathLike) -> Path:
    return paths.results_file(output_dir)


def eval_json_path(output_dir: str | os.PathLike, model_name: str, task: str) -> Path:
    return paths.eval_json(output_dir, model_name, task)


def write_eval_json(output_dir: str | os.PathLike, model_name: str, task: str, result: dict) -> Path:
    """Writes one evaluation's result (through a `.part` file, so readers never see half of it)."""
    path = eval_json_path(output_dir, model_name, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n")
    return path


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
    from lessctl.data.records import iter_json_lines

    return [rec for _, _, rec in iter_json_lines(path, "one evaluation record a line")]
