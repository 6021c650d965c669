"""Slurm scripts: rendering, quoting of hostile values, and (marked `slurm`) jobs on a real local Slurm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lessctl.slurm
from lessctl.config import load_config
from lessctl.errors import ConfigError, LessctlError
from lessctl.slurm.jobs import _aggregate, parse_sacct, parse_scontrol, parse_squeue, wait_for
from lessctl.slurm.quoting import TASK, sbatch_quote
from lessctl.slurm.render import log_dir, render_script
from lessctl.slurm.submit import JobSpec, submit_jobs, submit_pipeline, submit_script
from lessctl.vocab import SLURM_STAGES, STAGES

# A name that would run commands if it ever reached the shell unquoted.
HOSTILE = """a b 'c' "d" $(touch PWNED1) `touch PWNED2` ; touch PWNED3 # \\ %x 100%"""


def write_ws(root: Path, slurm_section: str = "", extra: str = "") -> Path:
    """A minimal workspace: enough for the commands the jobs run (`config show`, `slurm render`)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "lessctl.toml"
    section = textwrap.dedent(slurm_section)
    own = section.split("[", 1)[0]  # the [slurm] keys given (before any [slurm.stages.*] table)
    defaults = "".join(
        f"{k} = {v}\n" for k, v in (("cpus", "1"), ("gpus", "0"), ("time", '"10:00"')) if f"{k} =" not in own
    )
    path.write_text(
        '[experiment]\nname = "t"\noutput_dir = "out"\n\n[slurm]\n' + defaults + section + "\n" + textwrap.dedent(extra)
    )
    return path


def cfg_of(path: Path):
    return load_config(path)


def bash_n(text: str, tmp_path: Path) -> None:
    p = tmp_path / "check.sh"
    p.write_text(text)
    r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def run_with_stand_in(text: str, tmp_path: Path, env: dict[str, str] | None = None) -> dict:
    """Runs a rendered script with bash, LESSCTL_PYTHON pointing at a stand-in that records its argv."""
    record = tmp_path / "argv.json"
    dump = tmp_path / "dump.py"
    dump.write_text(
        "import json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': dict(os.environ)}}, open({str(record)!r}, "
        f"'w'))\n"
    )
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {dump} \"$@\"\n")
    fake.chmod(0o755)
    script = tmp_path / "job.sh"
    script.write_text(text)
    r = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "LESSCTL_PYTHON": str(fake), **(env or {})},
    )
    assert r.returncode == 0, r.stderr
    return json.loads(record.read_text())


def no_pwned(*roots: Path) -> None:
    for root in roots:
        hits = [p for p in root.rglob("PWNED*")]
        assert not hits, hits
    assert not list(Path.cwd().glob("PWNED*"))


# ------------------------------------------------------------------------------------- rendering


def test_every_shipped_template_renders_and_passes_bash_n(tmp_path):
    cfg = cfg_of(
        write_ws(tmp_path / "ws", "gpus = 4\nmodules = ['cuda/12.1', 'gcc']\nsetup = ['source venv/bin/activate']\n")
    )
    for stage in (*SLURM_STAGES, "config"):
        text = render_script(cfg, stage, ["--x", "1"])
        assert text.startswith("#!/bin/bash\n#SBATCH ")
        assert f" {stage} --x 1\n" in text and '\nexec "$LESSCTL_PYTHON" -m ' in text, text
        bash_n(text, tmp_path)
        one = render_script(cfg, stage, ["--x", "1"], gpus=1)
        assert f'\nexec "$LESSCTL_PYTHON" -m lessctl.cli --config {cfg.path} {stage} --x 1\n' in one, one
    arr = render_script(cfg, "grads", [], array="1-4", task_args=["--ckpt-index", TASK])
    bash_n(arr, tmp_path)
    assert '--ckpt-index "${SLURM_ARRAY_TASK_ID}"' in arr
    assert "#SBATCH --array=1-4" in arr and "grads-%A_%a.out" in arr
    shipped = Path(lessctl.slurm.__file__).parent / "templates"
    assert {p.name for p in shipped.glob("*.j2")} >= {f"{s}.sh.j2" for s in STAGES} | {"base.sh.j2"}


def test_rendered_script_runs_lessctl_in_the_workspace(tmp_path):
    path = write_ws(
        tmp_path / "ws", "modules = ['cuda/12.1']\nsetup = ['echo setting up']\nenv = {HF_HOME = '/scratch/hf'}\n"
    )
    cfg = cfg_of(path)
    text = render_script(cfg, "match", ["--target", "tydiqa"])
    lines = text.splitlines()
    directives = [l for l in lines if l.startswith("#SBATCH")]
    # every #SBATCH line comes before the first command
    first_cmd = next(i for i, l in enumerate(lines) if l and not l.startswith("#"))
    assert all(lines.index(d) < first_cmd for d in directives)
    assert "#SBATCH --job-name=t-match" in directives
    assert f"#SBATCH --output={tmp_path}/ws/out/slurm/logs/match-%j.out" in directives
    assert "#SBATCH --cpus-per-task=1" in directives and "#SBATCH --time=10:00" in directives
    assert not any("--gres" in d for d in directives)
    assert "module load cuda/12.1\n" in text and "echo setting up\n" in text
    assert "export HF_HOME=/scratch/hf\n" in text
    assert f"cd -- {tmp_path}/ws\n" in text
    assert f"LESSCTL_PYTHON={sys.executable}\n" in text
    assert text.rstrip().endswith(f'exec "$LESSCTL_PYTHON" -m lessctl.cli --config {path} match --target tydiqa')


def test_gpus_per_stage_and_torchrun(tmp_path):
    cfg = cfg_of(write_ws(tmp_path / "ws", "gpus = 4\n"))
    warm = render_script(cfg, "warmup", [])
    assert "#SBATCH --gres=gpu:4" in warm
    assert "-m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=4" in warm
    grads = render_script(cfg, "grads", [])
    assert "#SBATCH --gres=gpu:1" in grads and "--devices" not in grads
    assert "#SBATCH --gres=gpu:1" in render_script(cfg, "eval", [])
    assert "--gres" not in render_script(cfg, "match", [])
    one = render_script(cfg, "finetune", [], gpus=1)
    assert "#SBATCH --gres=gpu:1" in one and "torch.distributed.run" not in one


def test_stage_overrides_and_precedence(tmp_path):
    cfg = cfg_of(
        write_ws(
            tmp_path / "ws",
            """\
        partition = "gpu"
        env = {A = "1", B = "2"}
        [slurm.stages.grads]
        time = "2-00:00:00"
        partition = "big"
        memory = "64G"
        env = {B = "3"}
        sbatch_extra = ["--constraint=a100"]
        """,
        )
    )
    g = render_script(cfg, "grads", [])
    assert "#SBATCH --time=2-00:00:00" in g and "#SBATCH --partition=big" in g and "#SBATCH --mem=64G" in g
    assert "#SBATCH --constraint=a100" in g
    assert "export A=1\n" in g and "export B=3\n" in g
    m = render_script(cfg, "match", [])
    assert "#SBATCH --time=10:00" in m and "#SBATCH --partition=gpu" in m and "export B=2\n" in m
    # explicit options win over the file
    g2 = render_script(cfg, "grads", [], time="1:00:00", partition="x", memory="1G", job_name="j")
    assert "#SBATCH --time=1:00:00" in g2 and "#SBATCH --partition=x" in g2 and "#SBATCH --mem=1G" in g2
    assert "#SBATCH --job-name=j" in g2


def test_hostile_values_are_quoted_and_never_execute(tmp_path):
    ws = tmp_path / HOSTILE.replace("\\", "")  # a folder name with spaces, quotes, $(...), backticks, ; and #
    path = write_ws(ws, 'env = {X = "$(touch PWNED4) `touch PWNED5` \'q\' \\"dq\\""}\n')
    cfg = cfg_of(path)
    args = ["--name", HOSTILE, "--other=$(touch PWNED6)", "`touch PWNED7`", "'", '"', "{task}", "-", ""]
    text = render_script(cfg, "match", args, job_name=HOSTILE)
    bash_n(text, tmp_path)
    directives = [l for l in text.splitlines() if l.startswith("#SBATCH")]
    name = next(d for d in directives if d.startswith("#SBATCH --job-name="))
    assert name == "#SBATCH --job-name=" + sbatch_quote(HOSTILE)
    seen = run_with_stand_in(text, tmp_path)
    assert seen["argv"] == ["-m", "lessctl.cli", "--config", str(path), "match", *args]
    assert seen["cwd"] == str(ws)
    assert seen["env"]["X"] == "$(touch PWNED4) `touch PWNED5` 'q' \"dq\""
    no_pwned(tmp_path)


def test_task_placeholder_becomes_the_array_task_id(tmp_path):
    cfg = cfg_of(write_ws(tmp_path / "ws"))
    text = render_script(cfg, "grads", ["--ckpt", "105"], array="1-8", task_args=["--shard", "{task}/8"])
    assert 'grads --ckpt 105 --shard "${SLURM_ARRAY_TASK_ID}"/8' in text
    seen = run_with_stand_in(text, tmp_path, {"SLURM_ARRAY_TASK_ID": "3"})
    assert seen["argv"][-4:] == ["--ckpt", "105", "--shard", "3/8"]
    with pytest.raises(ConfigError, match="job array"):
        render_script(cfg, "grads", [], task_args=["--shard", "{task}/8"])


@pytest.mark.parametrize(
    "section, kwargs, message",
    [
        ("", {"job_name": "a\nb"}, "--job-name: .* contains a newline"),
        ('partition = "gpu\\nrm -rf /"\n', {}, "slurm.partition: .* contains a newline"),
        ('account = "a\\tb"\n', {}, "slurm.account: .* control character"),
        ("", {"time": "12h"}, "--time: '12h' is not a Slurm time"),
        ('[slurm.stages.grads]\ntime = "soon"\n', {}, "slurm.stages.grads.time: 'soon' is not a Slurm time"),
        ('memory = "lots"\n', {}, "slurm.memory: 'lots' is not a Slurm memory size"),
        ('[slurm.stages.grads]\ntiem = "1:00"\n', {}, "slurm.stages.grads.tiem: unknown key .*'time'"),
        ('[slurm.stages.grad]\ntime = "1:00"\n', {}, "slurm.stages.grad: unknown stage .*'grads'"),
        ('[slurm.stages.grads]\ngpus = "two"\n', {}, "slurm.stages.grads.gpus: expected an integer"),
        ('sbatch_extra = ["constraint=a100"]\n', {}, r"slurm.sbatch_extra\[0\]: expected an sbatch option"),
        ('sbatch_extra = ["--comment=a\\nb"]\n', {}, r"slurm.sbatch_extra\[0\]: .* contains a newline"),
        ('env = {"A-B" = "1"}\n', {}, "slurm.env.A-B: not a valid environment variable name"),
        ("", {"array": "1-4\n#SBATCH --x"}, "--array: .* contains a newline"),
        ("", {"array": "all"}, "--array: 'all' is not a Slurm array spec"),
        ("", {"dependency": "afterok:1 2"}, "--dependency: .* is not a Slurm dependency"),
        ("", {"cpus": 0}, "--cpus: must be at least 1"),
        ('templates = "nope"\n', {}, "slurm.templates: .* is not a folder"),
    ],
)
def test_bad_sbatch_values_are_one_line_errors(tmp_path, section, kwargs, message):
    cfg = cfg_of(write_ws(tmp_path / "ws", section))
    with pytest.raises(ConfigError, match=message) as exc:
        render_script(cfg, "grads", [], **kwargs)
    assert "\n" not in str(exc.value).replace("\\n", "")


def test_users_own_templates_folder(tmp_path):
    root = tmp_path / "ws"
    (root / "tmpl").mkdir(parents=True)
    (root / "tmpl" / "grads.sh.j2").write_text(
        '{% extends "base.sh.j2" %}\n{% macro hello(who) %}echo hello {{ who }}{% endmacro %}\n'
        '{% block prologue %}\necho "custom:" {{ job_name }}\n{{ hello(job_name) }}\n{% endblock %}\n'
        '{% block launch %}\ntime {{ super() }}{% endblock %}\n'
    )
    cfg = cfg_of(write_ws(root, 'templates = "tmpl"\n'))
    text = render_script(cfg, "grads", ["--ckpt", "1"], job_name="x $(y)")
    assert "echo \"custom:\" 'x $(y)'\n" in text  # the user's template gets quoting for free
    assert "echo hello 'x $(y)'\n" in text  # macros: quoted inside, printed as is
    assert f'time exec "$LESSCTL_PYTHON" -m lessctl.cli --config {cfg.path} grads --ckpt 1\n' in text
    assert "echo \"custom:\"" not in render_script(cfg, "match", [])  # other stages: shipped ones
    (root / "tmpl" / "match.sh.j2").write_text(
        '{% extends "base.sh.j2" %}\n{% block launch %}{{ nope }}{% endblock %}\n'
    )
    with pytest.raises(ConfigError, match=r"Slurm template .*match.sh.j2: 'nope' is undefined"):
        render_script(cfg, "match", [])
    (root / "tmpl" / "eval.sh.j2").write_text('{% extends "base.sh.j2" %}\n{% block launch %}{% if %}{% endblock %}\n')
    with pytest.raises(ConfigError, match=r"Slurm template .*eval.sh.j2:2: "):
        render_script(cfg, "eval", [])


# ------------------------------------------------------------------------------------- commands


def test_render_command_passes_stage_options_through(cli, tmp_path):
    path = write_ws(tmp_path / "ws")
    r = cli(
        "--config",
        path,
        "slurm",
        "render",
        "grads",
        "--ckpt",
        "105",
        "--dims",
        "8192",
        "4096",
        "--time",
        "1:00:00",
        "--job-name",
        "my job",
        "--projector=basic",
    )
    assert r.code == 0, r
    assert "#SBATCH --time=1:00:00" in r.out and '#SBATCH --job-name="my job"' in r.out
    # the stage's options as given: the job's lessctl reads `--dims 8192 4096` as grads declares --dims
    assert r.out.rstrip().endswith("grads --ckpt 105 --dims 8192 4096 --projector=basic")
    assert (tmp_path / "ws" / "out" / "slurm" / "logs").is_dir()
    # after --, even render's own option names go to the stage
    r = cli("--config", path, "slurm", "render", "grads", "--", "--time", "x")
    assert r.code == 0, r
    assert r.out.rstrip().endswith("grads --time x") and "#SBATCH --time=10:00" in r.out


def test_render_command_arrays(cli, tmp_path):
    path = write_ws(tmp_path / "ws")
    r = cli("--config", path, "slurm", "render", "grads", "--array", "1-4")
    assert r.code == 0, r
    assert "#SBATCH --array=1-4" in r.out and r.out.rstrip().endswith('grads --ckpt-index "${SLURM_ARRAY_TASK_ID}"')
    r = cli("--config", path, "slurm", "render", "grads", "--ckpt", "105", "--shards", "3")
    assert r.code == 0, r
    assert "#SBATCH --array=1-3" in r.out
    assert r.out.rstrip().endswith('grads --ckpt 105 --shard "${SLURM_ARRAY_TASK_ID}"/3')
    r = cli("--config", path, "slurm", "render", "grads", "--ckpt", "105", "--array", "1-4")
    assert r.code == 2 and "error: --array:" in r.err


def test_render_command_errors(cli, tmp_path):
    path = write_ws(tmp_path / "ws")
    r = cli("--config", path, "slurm", "render", "grad")
    assert r.code == 2 and r.err.strip() == "error: STAGE: unknown lessctl command 'grad' (did you mean 'grads'?)"
    r = cli("--config", path, "slurm", "render", "grads", "--job-name", "a\nb")
    assert r.code == 2 and r.err.startswith("error: --job-name:") and r.err.count("\n") == 1
    r = cli("--config", path, "slurm", "render", "match", "--shards", "2")
    assert r.code == 2 and "error: --shards: only grads" in r.err


def test_submit_dry_run_plans_the_chain(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch needed for a dry run
    path = write_ws(
        tmp_path / "ws",
        extra="""\
        [warmup]
        epochs = 3
        [data]
        targets = {tydiqa = "tydiqa", mine = {file = "mine.jsonl"}, mmlu = "mmlu"}
        """,
    )
    r = cli("--config", path, "slurm", "submit", "--dry-run", "--json")
    assert r.code == 0, r
    jobs = json.loads(r.out)["jobs"]
    assert [j["label"] for j in jobs] == [
        "warmup",
        "grads",
        "match",
        "finetune tydiqa",
        "finetune mine",
        "finetune mmlu",
        "eval tydiqa",
        "eval mmlu",
    ]
    assert [j["after"] for j in jobs] == [
        [],
        ["warmup"],
        ["grads"],
        ["match"],
        ["match"],
        ["match"],
        ["finetune tydiqa"],
        ["finetune mmlu"],
    ]
    assert jobs[4]["script"].rstrip().endswith("finetune --target mine --method less")
    model = tmp_path / "ws" / "out" / "finetune" / "mmlu-less"
    assert jobs[7]["script"].rstrip().endswith(f"eval --task mmlu --model {model}")
    grads = jobs[1]
    assert grads["array"] == "1-3" and '--ckpt-index "${SLURM_ARRAY_TASK_ID}"' in grads["script"]
    assert grads["sbatch"] == ["sbatch", "--parsable", "--dependency=afterok:<warmup>", "--kill-on-invalid-dep=yes"]
    assert all(j["job_id"] is None for j in jobs)
    assert not (tmp_path / "ws" / "out" / "slurm" / "jobs.json").exists()

    r = cli("--config", path, "slurm", "submit", "--dry-run", "--json", "--stages", "grads,match", "--shards", "2")
    jobs = json.loads(r.out)["jobs"]
    assert [j["label"] for j in jobs] == ["grads ckpt 1", "grads ckpt 2", "grads ckpt 3", "match"]
    assert jobs[0]["after"] == [] and jobs[3]["after"] == ["grads ckpt 1", "grads ckpt 2", "grads ckpt 3"]
    assert all(j["array"] == "1-2" for j in jobs[:3])
    assert 'grads --ckpt-index 2 --shard "${SLURM_ARRAY_TASK_ID}"/2' in jobs[1]["script"]

    r = cli("--config", path, "slurm", "submit", "--dry-run")  # human output: the scripts and a table
    assert r.code == 0 and r.out.count("#!/bin/bash") == 8 and "dry run" in r.out
    r = cli("--config", path, "slurm", "submit", "--dry-run", "--json", "--stages", "eval")
    assert [j["after"] for j in json.loads(r.out)["jobs"]] == [[], []]
    r = cli("--config", path, "slurm", "submit", "--dry-run", "--stages", "warmup,grdas")
    assert r.code == 2 and "error: --stages: unknown stage 'grdas' (did you mean 'grads'?)" in r.err


def test_without_slurm_the_errors_say_so(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    path = write_ws(tmp_path / "ws")
    with pytest.raises(LessctlError, match="sbatch is not on PATH"):
        submit_script("#!/bin/bash\ntrue\n")
    r = cli("--config", path, "slurm", "submit", "--stages", "match")
    assert r.code == 2 and "sbatch is not on PATH" in r.err
    r = cli("--config", path, "slurm", "status")
    assert r.code == 2 and "lessctl slurm submit" in r.err


def test_parsing_squeue_sacct_scontrol():
    sq = parse_squeue(
        "7|COMPLETED|None\n8_1|COMPLETED|None\n8_2|RUNNING|None\n8_3|PENDING|Resources\n9|PENDING|Dependency\n"
    )
    assert _aggregate("8", sq["8"], "squeue").state == "RUNNING"
    assert _aggregate("8", sq["8"], "squeue").tasks == {"1": "COMPLETED", "2": "RUNNING", "3": "PENDING"}
    st = _aggregate("9", sq["9"], "squeue")
    assert (st.state, st.reason, st.done) == ("PENDING", "Dependency", False)
    sa = parse_sacct(
        "10|COMPLETED|0:0\n10.batch|COMPLETED|0:0\n11_1|FAILED|2:0\n11_2|COMPLETED|0:0\n"
        "11_[3-4]|PENDING|0:0\n12|CANCELLED by 0|0:0\n"
    )
    assert "10.batch" not in sa and _aggregate("10", sa["10"], "sacct").state == "COMPLETED"
    s11 = _aggregate("11", sa["11"], "sacct")
    assert (s11.state, s11.reason, s11.done) == ("FAILED", "exit 2:0", True)
    assert _aggregate("12", sa["12"], "sacct").state == "CANCELLED"
    sc = parse_scontrol(
        "JobId=5 ArrayJobId=4 ArrayTaskId=1 JobName=x y JobState=COMPLETED Reason=None Dependency=(null)\n"
        "JobId=4 ArrayJobId=4 ArrayTaskId=2-3 JobName=x JobState=PENDING Reason=Dependency\n"
    )
    assert sc == [("1", "COMPLETED", "None"), ("2-3", "PENDING", "Dependency")]


# ------------------------------------------------------------------------------------- real Slurm


def wait(ids, timeout_s: float = 90):
    return wait_for(ids, timeout_s=timeout_s, poll_s=0.25)


def scontrol_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    line = out.splitlines()[0]
    # JobName may contain spaces: take it between "JobName=" and " UserId="
    name = line.split(" JobName=", 1)[1].split(" UserId=", 1)[0]
    fields = {k: v for k, _, v in (w.partition("=") for w in line.split())}
    fields["JobName"] = name
    return fields


@pytest.mark.slurm
def test_rendered_stage_runs_to_completion(local_slurm, tmp_path):
    # TODO(tiny pipeline): a real stage here once one runs in seconds; `config show` is real and cheap.
    ws = tmp_path / HOSTILE.replace("\\", "").replace("%x ", "")
    path = write_ws(ws)
    cfg = cfg_of(path)
    text = render_script(cfg, "config", ["show", "--json"], job_name=HOSTILE)
    log_dir(cfg, create=True)
    job = submit_script(text, cwd=tmp_path)
    st = wait([job])[job]
    assert st.state == "COMPLETED", (st, local_slurm.log_tail())
    assert scontrol_fields(job)["JobName"] == HOSTILE
    out = json.loads((ws / "out" / "slurm" / "logs" / f"config-{job}.out").read_text())
    assert out["path"] == str(path) and out["experiment"]["name"] == "t"
    no_pwned(tmp_path)


@pytest.mark.slurm
def test_submitted_chain_runs_in_dependency_order(local_slurm, cli, tmp_path):
    # TODO(tiny pipeline): test_pipeline_on_slurm below does this with warmup -> grads (marked slow).
    path = write_ws(tmp_path / "ws")
    cfg = cfg_of(path)
    specs = [
        JobSpec("config", ("show",), label="first", overrides={"setup": ["sleep 2"]}),
        JobSpec("config", ("show", "--json"), label="second", after=(0,)),
    ]
    rows = submit_jobs(cfg, specs)
    first, second = rows[0]["job_id"], rows[1]["job_id"]
    assert rows[1]["after"] == [first]
    states = wait([first, second])
    assert states[first].state == states[second].state == "COMPLETED", (states, local_slurm.log_tail())
    f1, f2 = scontrol_fields(first), scontrol_fields(second)
    assert f2["Dependency"] == "(null)"  # satisfied and cleared
    assert f1["EndTime"] <= f2["StartTime"]  # ISO timestamps: the second started after the first ended
    assert json.loads(Path(rows[1]["log"]).read_text())["path"] == str(path)
    recorded = json.loads((tmp_path / "ws" / "out" / "slurm" / "jobs.json").read_text())
    assert [j["job_id"] for j in recorded["jobs"]] == [first, second]
    assert Path(recorded["jobs"][0]["script"]).read_text().startswith("#!/bin/bash")
    r = cli("--config", path, "slurm", "status", "--json")
    assert r.code == 0, r
    assert [j["state"] for j in json.loads(r.out)["jobs"]] == ["COMPLETED", "COMPLETED"]
    r = cli("--config", path, "slurm", "status")
    assert r.code == 0 and "COMPLETED" in r.out


@pytest.mark.slurm
def test_array_job_over_shards_produces_every_shard(local_slurm, tmp_path):
    # Each task runs `lessctl slurm render grads --shard K/3`: a real command whose output shows the
    # shard it was given. TODO(tiny pipeline): `grads --shard {task}/3` writing shard stores.
    path = write_ws(tmp_path / "ws")
    cfg = cfg_of(path)
    text = render_script(cfg, "slurm", ["render", "grads"], array="1-3", task_args=["--shard", "{task}/3"])
    log_dir(cfg, create=True)
    job = submit_script(text)
    st = wait([job])[job]
    assert st.state == "COMPLETED" and st.tasks == {"1": "COMPLETED", "2": "COMPLETED", "3": "COMPLETED"}, st
    for k in (1, 2, 3):
        log = (tmp_path / "ws" / "out" / "slurm" / "logs" / f"slurm-{job}_{k}.out").read_text()
        assert log.rstrip().endswith(f"grads --shard {k}/3"), log


@pytest.mark.slurm
def test_failed_job_stops_its_dependents(local_slurm, cli, tmp_path):
    path = write_ws(tmp_path / "ws")
    cfg = cfg_of(path)
    specs = [
        JobSpec("config", ("show", "--no-such-option"), label="bad"),
        JobSpec("config", ("show",), label="after-bad", after=(0,)),
    ]
    rows = submit_jobs(cfg, specs)
    bad, dep = rows[0]["job_id"], rows[1]["job_id"]
    states = wait([bad, dep])
    assert states[bad].state == "FAILED", states
    assert states[dep].state == "CANCELLED" and states[dep].reason == "DependencyNeverSatisfied", states
    assert "No such option" in Path(rows[0]["log"]).read_text()
    assert not Path(rows[1]["log"]).exists()  # it never ran
    r = cli("--config", path, "slurm", "status", "--json")
    assert [j["state"] for j in json.loads(r.out)["jobs"]] == ["FAILED", "CANCELLED"]


@pytest.mark.slurm
def test_sbatch_refusal_is_a_clear_error(local_slurm, cli, tmp_path):
    path = write_ws(tmp_path / "ws", 'partition = "nosuchpartition"\n')
    r = cli("--config", path, "slurm", "submit", "--stages", "warmup,grads")
    assert r.code == 2, r
    assert r.err.startswith("error: sbatch refused the job: ") and "nosuchpartition" in r.err.lower(), r.err
    assert r.err.count("\n") == 1
    assert not (tmp_path / "ws" / "out" / "slurm" / "jobs.json").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_pipeline_on_slurm(local_slurm, cli, tmp_path):
    """`submit` of warmup -> grads (2 shards of one checkpoint) with the tiny workspace: real stages."""
    from lessctl.workspace import init_workspace

    path = init_workspace(tmp_path / "ws", "tiny")
    text = path.read_text()
    text = text.replace("[warmup]\npercentage = 0.5\nepochs = 4", "[warmup]\npercentage = 0.02\nepochs = 1", 1)
    assert "epochs = 1" in text
    path.write_text(text + '\n[slurm]\ncpus = 1\ngpus = 0\ntime = "10:00"\n')
    cfg = cfg_of(path)
    rows = submit_pipeline(
        cfg,
        ["warmup", "grads"],
        shards=2,
        extra_args={
            "warmup": ["--device", "cpu"],
            "grads": ["--device", "cpu", "--train", "synth_a", "--target", "arithmetic"],
        },
    )
    assert [r["label"] for r in rows] == ["warmup", "grads ckpt 1"] and rows[1]["array"] == "1-2"
    states = wait([r["job_id"] for r in rows], timeout_s=400)
    assert all(s.state == "COMPLETED" for s in states.values()), (states, [Path(r["log"]).parent for r in rows])
    step = json.loads((tmp_path / "ws" / "out" / "warmup" / "checkpoints.json").read_text())[0]["step"]
    grads = tmp_path / "ws" / "out" / "grads"
    for name, kind in (("synth_a", "adam"), ("arithmetic", "sgd")):
        for k in (1, 2):
            assert (grads / f"{name}-ckpt{step}-{kind}-shard{k}of2.h5").is_file(), sorted(grads.iterdir())


def test_grads_on_several_gpus_runs_one_worker_per_gpu(tmp_path):
    """[slurm.stages.grads] gpus = 4: the job asks for 4 GPUs and runs `lessctl grads --devices 4`; an option
    that --devices replaces is refused with the setting named."""
    cfg = cfg_of(write_ws(tmp_path / "ws", "gpus = 1\n[slurm.stages.grads]\ngpus = 4\n"))
    script = render_script(cfg, "grads", ["--ckpt", "3"])
    assert "#SBATCH --gres=gpu:4" in script
    line = next(ln for ln in script.splitlines() if " grads " in ln and "--ckpt 3" in ln)
    assert line.rstrip().endswith("--devices 4")
    with pytest.raises(ConfigError, match=r"slurm.stages.grads.gpus = 4: .*--devices 4.*replaces --shard"):
        render_script(cfg, "grads", ["--shard", "1/2"])
