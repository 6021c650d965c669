"""Progress without a terminal: plain lines on stderr (Slurm logs), rich bars only on a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _run(ws, *args, seconds="0", timeout=600):
    """`lessctl ARGS` in a subprocess whose stderr is a file, as under sbatch."""
    err_path = ws / "job.err"
    env = {**os.environ, "LESSCTL_PROGRESS_SECONDS": seconds}
    with open(err_path, "w") as err:
        out = subprocess.run(
            [sys.executable, "-c", "from lessctl.cli import main; main()", *args],
            cwd=ws,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=timeout,
        )
    return out.returncode, out.stdout, err_path.read_text()


def test_grads_prints_plain_progress_lines_into_a_log_file(tiny_ws):
    code, out, err = _run(tiny_ws, "grads", "--train", "synth_a", "--target", "arithmetic", "--dims", "16", "--json")
    assert code == 0, err
    json.loads(out)  # --json keeps stdout one JSON object
    assert "\r" not in err and "\x1b" not in err  # no carriage returns, no colour codes
    lines = [ln for ln in err.splitlines() if " grads" in ln and " | " in ln]
    assert lines[0].endswith("| started") and lines[-1].endswith("| finished")
    starts = [ln for ln in lines if ln.endswith("| start")]
    dones = [ln for ln in lines if ln.endswith("| done")]
    # one start and one end per store (2 data sets x 2 checkpoints), each naming the store and its count
    assert len(starts) == 4 and len(dones) == 4, err
    assert any("| synth_a ckpt" in ln for ln in dones) and any("| arithmetic ckpt" in ln for ln in dones)
    for ln in dones:
        fields = ln.split(" | ")
        done, total = fields[2].split()[0].split("/")
        assert done == total and int(total) > 0, ln
        assert fields[3].endswith("ex/s") and fields[4].startswith("elapsed ") and fields[5].startswith("ETA ")


def test_interval_lines_appear_while_an_item_runs(tiny_ws):
    code, _, err = _run(tiny_ws, "warmup", "--force", "--epochs", "1")
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if " warmup | " in ln]
    assert lines[0].endswith("| started") and lines[-1].endswith("| finished")
    periodic = [ln for ln in lines[1:-1]]
    assert len(periodic) >= 2 and any("| loss " in ln for ln in periodic), err  # every update with 0 s between lines


def test_a_long_interval_prints_only_start_and_end(tiny_ws):
    code, _, err = _run(tiny_ws, "warmup", "--force", "--epochs", "1", seconds="3600")
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if " warmup | " in ln]
    assert [ln.rsplit(" | ", 1)[-1] for ln in lines] == ["started", "finished"], err


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_interval_is_one_error_line(tiny_ws, value):
    code, _, err = _run(tiny_ws, "grads", "--train", "synth_a", "--dims", "16", seconds=value)
    assert code == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "LESSCTL_PROGRESS_SECONDS" in errors[0] and "Traceback" not in err


def test_the_global_option_overrides_the_environment(tiny_ws):
    code, _, err = _run(tiny_ws, "--progress-seconds", "3600", "warmup", "--force", "--epochs", "1", seconds="0")
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if " warmup | " in ln]
    assert [ln.rsplit(" | ", 1)[-1] for ln in lines] == ["started", "finished"], err


def test_run_reports_each_job_that_works_as_an_item(tiny_ws):
    """`lessctl run` (what the study's Slurm jobs execute) names each job that does work and counts inside it:
    training steps with the loss, store rows; complete jobs (the fixture's warmup) say nothing."""
    items = ("--items", "match sorting/bm25", "--items", "finetune sorting-bm25")
    code, out, err = _run(tiny_ws, "run", "--methods", "bm25", *items, "--json")
    assert code == 0, err
    assert json.loads(out)["done"] == 2
    lines = [ln for ln in err.splitlines() if " run | " in ln]
    assert lines[0].endswith("| started") and lines[-1].endswith("| finished"), err
    items = [ln.split(" | ")[1] for ln in lines if ln.endswith("| start")]
    assert items == ["finetune sorting-bm25"], err  # the match is quick: no count of its own
    (done,) = [ln for ln in lines if ln.endswith("| done")]
    steps, total = done.split(" | ")[2].split()[0].split("/")
    assert steps == total and int(total) > 0 and "steps" in done and "| loss " in done, err
    assert any("| loss " in ln and not ln.endswith("| done") for ln in lines[1:-1]), err

    code, out, err = _run(tiny_ws, "run", "--until", "grads", "--json")  # the warmup is done: only stores
    assert code == 0, err
    items = [ln.split(" | ")[1] for ln in err.splitlines() if " run | " in ln and ln.endswith("| start")]
    assert items and all(i.startswith("grads: ") and " ckpt " in i for i in items), err
    assert len(items) == len({i for i in items}) == 2 * 5  # 2 checkpoints x (2 pools + 3 targets)
