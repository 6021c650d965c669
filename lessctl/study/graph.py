"""The study's jobs: a Plan expanded into warmup -> grads -> match -> finetune -> eval items, what each waits for,
and each one's state on disk: current, stale (what made it changed: lessctl.outputs.provenance) or missing.

One job per item: `match <target>/<selection>`, `finetune <model>`, `eval <model>/<task>`. A selection is a
method's folder under selected/<target>/ (random draws: `random`, `random-seed<s>`; ablation subsets:
`less-ckpt<subset>`); a model is a folder under finetune/ (`<target>-<selection>`, transfer:
`<target>-less-<model folder name>`; a random draw does not depend on the target: one model per draw,
`random` or `random-seed<s>`, trained on the first target's selection and evaluated on every target), or
`base`. `lessctl run` runs the jobs in order and `lessctl slurm submit` submits them; both skip current ones,
so a re-run does only what is missing or stale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lessctl.config import Config
from lessctl.evaluation.ranking import BM25_MODEL
from lessctl.evaluation.targets import RANKING, TargetEval, target_eval
from lessctl.outputs import artifacts, provenance
from lessctl.outputs import layout as paths
from lessctl.outputs.artifacts import CURRENT, MISSING, STALE, State
from lessctl.study.plan import Plan, seed_run_config
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
                sel = paths.random_selection(seed, cfg.experiment.seed) if seed is not None else method
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
                sel = paths.ablation_selection(subset)
                selections.append(
                    Job(f"match {target}/{sel}", "match", ("grads",), "ablation", target, sel, "less", subset=subset)
                )
        jobs += selections
        for m in selections:
            name = paths.selection_model(target, m.selection, m.method)
            if any(f.model == name for f in finetunes):  # a random draw: trained once, on the first target's file
                continue
            ft = dataclasses.replace(m, key=f"finetune {name}", stage="finetune", after=(m.key,), model=name)
            finetunes.append(ft)
        if plan.uses_checkpoints:
            for other in plan.transfer:
                name = paths.transfer_model(target, other, plan.transfer)
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
        every = ft.branch == FULL or ft.method == "random"  # the full-pool model and a random draw: every target
        for target in cfg.data.targets if every else [ft.target]:
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
                name = paths.finetune_name(target, method)
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


def job_state(cfg: Config, job: Job) -> State:
    """Whether the job's artifact is on disk and current: its recorded fingerprint equals the one the job would
    record now (lessctl.outputs.provenance); otherwise what is missing or what changed."""
    if job.reason:
        return State(CURRENT)
    cfg = job_config(cfg, job)
    out = cfg.output_dir
    if job.stage == "warmup":
        return artifacts.warmup_state(out, provenance.warmup_fingerprint(cfg))
    if job.stage == "grads":
        return _grads_state(cfg, job)
    if job.stage == "match":
        now = match_fingerprint(cfg, job)
        if now is None:
            return State(MISSING, "the warmup's checkpoints.json is missing or damaged")
        return artifacts.selection_state(out, job.target, job.selection, now)
    if job.stage == "finetune":
        now = finetune_fingerprint(cfg, job)
        if now is None:
            return State(MISSING, f"no selection {job.target}/{job.selection}")
        return artifacts.adapter_state(out, job.model, now)
    return artifacts.eval_state(out, job.model, job.task, eval_fingerprint(cfg, job))


def match_fingerprint(cfg: Config, job: Job) -> provenance.Fingerprint | None:
    """The fingerprint a match job records (None: an ablation subset whose checkpoints cannot be read yet)."""
    from lessctl.vocab import REPS_METHODS

    ckpts = None
    if job.subset:
        steps = artifacts.checkpoint_steps(cfg.output_dir)
        if steps is None or max(job.subset) > len(steps):
            return None
        ckpts = [steps[p - 1] for p in job.subset]
    stores = job.method in CHECKPOINT_METHODS or job.method in REPS_METHODS
    return provenance.selection_fingerprint(
        cfg,
        job.target,
        job.method,
        seed=job.seed,
        ckpts=ckpts,
        warmup_run=artifacts.warmup_run_id(cfg.output_dir) if stores else None,
    )


def finetune_fingerprint(cfg: Config, job: Job) -> provenance.Fingerprint | None:
    """The fingerprint a finetune job records (None: its selection is not there yet)."""
    if job.branch == FULL:
        return provenance.adapter_fingerprint(cfg, None, pool=True)
    jsonl = artifacts.selection_jsonl(cfg.output_dir, job.target, job.selection)
    if jsonl is None:
        return None
    sid = artifacts.selection_id(cfg.output_dir, job.target, job.selection)
    return provenance.adapter_fingerprint(cfg, jsonl, base_model=job.base_model, selection=sid)


def plan_states(cfg: Config, jobs: list[Job]) -> dict[str, State]:
    """Each job's state as `lessctl run` will find it when its turn comes: its own state, or stale when a job it
    waits for is redone and gives it a new upstream id (a warmup, a selection, an adapter: every new one has a
    new id). A gradient store redone changes a selection only through what the selection's own fingerprint
    already holds (the sources, the warmup run), so after grads the job's own state stands."""
    states: dict[str, State] = {}
    renewed: set[str] = set()  # jobs that will give what follows them a new upstream id
    for job in jobs:
        state = job_state(cfg, job)
        redone = [a for a in job.after if a in renewed]
        if redone and state.current:
            state = State(STALE, f"{redone[0]} runs first")
        states[job.key] = state
        if not state.current and (job.stage != "grads" or redone):  # stores keep the ids of what made them
            renewed.add(job.key)
    return states


def eval_fingerprint(cfg: Config, job: Job) -> provenance.Fingerprint:
    """The fingerprint an eval job records: the eval settings, the eval file, the model's id."""
    return provenance.eval_fingerprint(cfg, job.task, eval_file=job.eval_file, model=model_id(cfg, job.model))


def model_id(cfg: Config, model: str) -> str | None:
    """What an evaluation records of its model (lessctl.outputs.provenance.model_id)."""
    return artifacts.model_id(cfg, model, paths.finetune_dir(cfg.output_dir, model))


def _grads_state(cfg: Config, job: Job) -> State:
    from lessctl.grads.stage import data_sets, stale_reason
    from lessctl.grads.store.reader import list_stores

    steps = artifacts.checkpoint_steps(cfg.output_dir)
    if steps is None:
        return State(MISSING, "the warmup's checkpoints.json is missing or damaged")
    grads_dir = paths.grads_dir(cfg.output_dir)
    stores = {(s["name"], s["step"], s["grad_type"]): s for s in list_stores(grads_dir)} if grads_dir.is_dir() else {}
    if job.method == REPS:
        wanted = [(ds, steps[-1]) for ds in data_sets(cfg, None, None, REPS)]
    else:
        wanted = [(ds, s) for ds in data_sets(cfg, None, None, None) for s in steps]
    run_id = artifacts.warmup_run_id(cfg.output_dir)
    dims = set(cfg.grads.dims)
    for ds, step in wanted:
        name = paths.format_store_name(ds.name, step, ds.grad_type)
        s = stores.get((ds.name, step, ds.grad_type))
        if s is None or not s["complete"]:
            return State(MISSING, f"no complete store {name}")
        if job.method != REPS and not dims <= set(s["dims"]):
            lack = ", ".join(str(d) for d in sorted(dims - set(s["dims"])))
            return State(STALE, f"{name} lacks dim {lack}")
        attrs, sha = s.get("attrs") or {}, provenance.files_sha256(ds.files)
        why = stale_reason(attrs, sha, run_id, ds.files[0], cfg)
        if why:
            return State(STALE, f"{name}: {why}")
    return State(CURRENT)


def stage_order(jobs: list[Job]) -> list[Job]:
    """The jobs sorted by stage, keeping their order within a stage."""
    return sorted(jobs, key=lambda j: STAGES.index(j.stage))


def describe(job: Job) -> dict[str, Any]:
    """The job as `--dry-run --json` shows it."""
    d = {k: v for k, v in dataclasses.asdict(job).items() if v not in (None, "", ())}
    d["after"] = list(job.after)
    return d
