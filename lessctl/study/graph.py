"""The study's jobs: a Plan expanded into warmup -> grads -> match -> finetune -> eval items, what each waits for,
whether it is complete on disk, and an estimate of its GPU time.

One job per item: `match <target>/<selection>`, `finetune <model>`, `eval <model>/<task>`. A selection is a
method's folder under selected/<target>/ (random draws: `random`, `random-seed<s>`; ablation subsets:
`less-ckpt<subset>`); a model is a folder under finetune/ (`<target>-<selection>`, transfer:
`<target>-less-<model folder name>`), or `base`. `lessctl run` runs the jobs in order and `lessctl slurm submit`
submits them; both skip complete ones, so a re-run does only what is missing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lessctl import paths
from lessctl.config import Config
from lessctl.evaluation.ranking import BM25_MODEL
from lessctl.evaluation.targets import RANKING, TargetEval, target_eval
from lessctl.study.plan import Plan, random_selection, seed_run_config, transfer_name
from lessctl.vocab import CHECKPOINT_METHODS, REPS, REPS_METHODS, STAGES

BASE = "base"
FULL = "full"  # the model finetuned on the whole pool


@dataclass(frozen=True)
class Job:
    """One item of the study. `key` names it (`lessctl run --items`); `after` holds the keys it waits for."""

    key: str
    stage: str
    after: tuple[str, ...] = ()
    branch: str = "main"  # main | ablation | transfer | base | full
    target: str | None = None
    selection: str | None = None  # the folder under selected/<target>/
    method: str | None = None
    seed: int | None = None  # a random draw's seed
    subset: tuple[int, ...] = ()  # ablation: 1-based checkpoint positions
    model: str | None = None  # finetune: its folder under finetune/; eval: that folder's name or `base`
    base_model: str | None = None  # transfer: the other base model
    task: str | None = None  # eval: mmlu, bbh, tydiqa, or a custom target's name
    eval_file: str | None = None  # eval of a custom target: its held-out file
    reason: str = ""  # set when the job does not apply (a custom target without eval_file)
    run_seed: int | None = None  # a further warmup run's seed ([study] warmup_seeds): its own output folder

    @property
    def item(self) -> str:
        """The job as `lessctl run` reports it."""
        return {"match": f"{self.target}/{self.selection}", "finetune": self.model}.get(
            self.stage, f"{self.model}/{self.task}" if self.stage == "eval" else self.key
        )


def _eval_fields(te: TargetEval, target: str) -> dict[str, Any]:
    """An eval job's task, eval_file and reason (lessctl.evaluation.targets decides them)."""
    return {"task": te.task or target, "eval_file": str(te.eval_file) if te.eval_file else None, "reason": te.reason}


def expand(cfg: Config, plan: Plan) -> list[Job]:
    """Every job of the plan, in stage order (each job after the jobs it waits for)."""
    from lessctl.study.ablation import subset_label

    methods = plan.methods
    evals = {t: target_eval(cfg, t) for t in cfg.data.targets}  # read once: a custom eval_file's first record
    gradients = any(m in CHECKPOINT_METHODS for m in methods)
    reps = any(m in REPS_METHODS for m in methods)
    jobs: list[Job] = []
    if gradients or reps:
        jobs.append(Job("warmup", "warmup"))
    if gradients:
        jobs.append(Job("grads", "grads", ("warmup",)))
    if reps:
        jobs.append(Job("grads reps", "grads", ("warmup",), method=REPS))

    def match_after(method: str) -> tuple[str, ...]:
        return ("grads",) if method in CHECKPOINT_METHODS else ("grads reps",) if method in REPS_METHODS else ()

    finetunes: list[Job] = []
    for target in cfg.data.targets:
        selections: list[Job] = []
        for method in methods:
            seeds = plan.random_seeds if method == "random" else (None,)
            for seed in seeds:
                sel = random_selection(cfg, seed) if seed is not None else method
                selections.append(
                    Job(
                        f"match {target}/{sel}",
                        "match",
                        match_after(method),
                        target=target,
                        selection=sel,
                        method=method,
                        seed=seed,
                    )  # fmt: skip
                )
        if plan.uses_checkpoints:
            for subset in plan.ablation:
                sel = f"less-ckpt{subset_label(subset)}"
                selections.append(
                    Job(f"match {target}/{sel}", "match", ("grads",), "ablation", target, sel, "less", subset=subset)
                )
        jobs += selections
        for m in selections:
            name = f"{target}-{m.selection}"
            ft = dataclasses.replace(m, key=f"finetune {name}", stage="finetune", after=(m.key,), model=name)
            finetunes.append(ft)
        if plan.uses_checkpoints:
            for other in plan.transfer:
                name = f"{target}-less-{transfer_name(other)}"
                finetunes.append(
                    Job(
                        f"finetune {name}",
                        "finetune",
                        (f"match {target}/less",),
                        "transfer",
                        target,
                        "less",
                        "less",
                        model=name,
                        base_model=other,
                    )  # fmt: skip
                )
    if plan.full:
        finetunes.append(Job(f"finetune {FULL}", "finetune", (), FULL, model=FULL))
    jobs += finetunes
    for target in cfg.data.targets if plan.base else ():
        fields = _eval_fields(evals[target], target)
        jobs.append(Job(f"eval {BASE}/{fields['task']}", "eval", (), "base", target, model=BASE, **fields))
        if evals[target].kind == RANKING:
            jobs.append(Job(f"eval {BM25_MODEL}/{fields['task']}", "eval", (), "base", target, model=BM25_MODEL,
                            **fields))  # fmt: skip
    if gradients:
        more = _seed_runs(cfg, plan, jobs)
        jobs += more
        finetunes += more
    for ft in finetunes:
        for target in [ft.target] if ft.target else cfg.data.targets:  # the full-pool model: every target
            fields = _eval_fields(evals[target], target)
            run = "" if ft.run_seed is None else f"seed{ft.run_seed} "
            jobs.append(dataclasses.replace(ft, key=f"{run}eval {ft.model}/{fields['task']}", stage="eval",
                                            after=(ft.key,), target=target, **fields))  # fmt: skip
    return stage_order(jobs)  # the further warmup runs' jobs among their stages


def _seed_runs(cfg: Config, plan: Plan, jobs: list[Job]) -> list[Job]:
    """Each further warmup seed's warmup, grads and LESS matches (appended to `jobs`) and its finetunes
    (returned): the workspace's own LESS chain again, keys prefixed `seed<s> `, in <output_dir>/warmup-seed<s>/."""
    finetunes: list[Job] = []
    for s in plan.warmup_seeds:
        p = f"seed{s} "
        jobs += [Job(p + "warmup", "warmup", run_seed=s), Job(p + "grads", "grads", (p + "warmup",), run_seed=s)]
        for target in cfg.data.targets:
            for method in (m for m in plan.methods if m in CHECKPOINT_METHODS):
                m = Job(f"{p}match {target}/{method}", "match", (p + "grads",), target=target, selection=method,
                        method=method, run_seed=s)  # fmt: skip
                jobs.append(m)
                name = f"{target}-{method}"
                finetunes.append(dataclasses.replace(m, key=f"{p}finetune {name}", stage="finetune", after=(m.key,),
                                                     model=name))  # fmt: skip
    return finetunes


def job_config(cfg: Config, job: Job) -> Config:
    """The workspace as the job sees it: a further warmup run's own output folder and seeds."""
    return seed_run_config(cfg, job.run_seed)


def only_stages(jobs: list[Job], stages: list[str]) -> list[Job]:
    """The jobs of these stages; what they wait for outside them counts as done."""
    keep = [j for j in jobs if j.stage in stages]
    keys = {j.key for j in keep}
    return [dataclasses.replace(j, after=tuple(a for a in j.after if a in keys)) for j in keep]


# ----------------------------------------------------------------------------- completion


def is_complete(cfg: Config, job: Job) -> bool:
    """Whether the job's outputs are on disk and current (an eval older than its finetune is not)."""
    if job.reason:
        return True
    cfg = job_config(cfg, job)
    out = cfg.output_dir
    if job.stage == "warmup":
        return paths.checkpoints_file(out).is_file()
    if job.stage == "grads":
        return _grads_complete(cfg, job)
    if job.stage == "match":
        return (paths.selection_dir(out, job.target, job.selection) / "summary.json").is_file()
    if job.stage == "finetune":
        return finetune_state(cfg, job) == "complete"
    from lessctl.evaluation.results import eval_json_path

    result = eval_json_path(out, job.model, job.task)
    if not result.is_file() or not _same_limit(result, cfg.eval.limit or None):
        return False
    trained = paths.finetune_dir(out, job.model) / "lessctl_run.json"
    return job.model == BASE or not trained.is_file() or result.stat().st_mtime >= trained.stat().st_mtime


def _same_limit(result, limit: int | None) -> bool:
    """Whether a saved evaluation ran with `[eval] limit` as it is now (results that do not record one count)."""
    import json

    try:
        settings = json.loads(result.read_text()).get("settings") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return "limit" not in settings or settings["limit"] == limit


def finetune_state(cfg: Config, job: Job) -> str:
    """complete, stale (the selection changed since the adapter was trained) or missing."""
    from lessctl.models import is_adapter_dir
    from lessctl.training import adapter_is_stale

    cfg = job_config(cfg, job)
    out = paths.finetune_dir(cfg.output_dir, job.model)
    if not is_adapter_dir(out):
        return "missing"
    if job.branch == FULL:  # stale when the pool file is not what it trained on, or a pool file is newer
        pool = paths.full_pool_file(cfg.output_dir)
        if not pool.is_file() or adapter_is_stale(out, pool):
            return "stale"
        newest = max((p.stat().st_mtime for p in cfg.train_files().values() if p.is_file()), default=0.0)
        return "stale" if newest > pool.stat().st_mtime else "complete"
    summary = paths.selection_dir(cfg.output_dir, job.target, job.selection) / "summary.json"
    if not summary.is_file():
        return "complete"
    from lessctl.select.match import selection_file

    return "stale" if adapter_is_stale(out, selection_file(cfg, job.target, job.selection)) else "complete"


def _grads_complete(cfg: Config, job: Job) -> bool:
    import json

    from lessctl.grads.store.reader import list_stores

    try:
        steps = [c["step"] for c in json.loads(paths.checkpoints_file(cfg.output_dir).read_text())]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    grads_dir = paths.grads_dir(cfg.output_dir)
    stores = {(s["name"], s["step"], s["grad_type"]): s for s in list_stores(grads_dir)} if grads_dir.is_dir() else {}
    if job.method == REPS:
        wanted = [(n, steps[-1], REPS) for n in [*cfg.data.train, *cfg.data.targets]]
    else:
        wanted = [(n, s, "adam") for n in cfg.data.train for s in steps]
        wanted += [(n, s, "sgd") for n in cfg.data.targets for s in steps]
    dims = set(cfg.grads.dims)
    return all(
        (s := stores.get(w)) is not None and s["complete"] and (job.method == REPS or dims <= set(s["dims"]))
        for w in wanted
    )


def stage_order(jobs: list[Job]) -> list[Job]:
    """The jobs sorted by stage, keeping their order within a stage."""
    return sorted(jobs, key=lambda j: STAGES.index(j.stage))


def describe(job: Job) -> dict[str, Any]:
    """The job as `--dry-run --json` shows it."""
    d = {k: v for k, v in dataclasses.asdict(job).items() if v not in (None, "", ())}
    d["after"] = list(job.after)
    return d
