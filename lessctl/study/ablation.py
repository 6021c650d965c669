"""Checkpoint ablation: LESS selections from subsets of the warmup checkpoints, compared with the all-checkpoint one.

Every subset is matched from the gradient stores already on disk (nothing is recomputed) into
`selected/<target>/<method>-ckpt<subset>/`. Each is compared with the selection made from all
checkpoints: Jaccard overlap, the share of the full selection it keeps, and the Spearman rank
correlation of the scores of every pool row. The report goes to `selected/<target>/ablation.json`
and the pairwise overlaps to a heat map beside it (`ablation_overlap.png`, needs matplotlib).
Optionally each selection is finetuned (`finetune/<target>-<method>-ckpt<subset>/`) and evaluated.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lessctl import __version__
from lessctl.config import Config
from lessctl.errors import AlreadyExistsError, ConfigError, MissingArtifactError
from lessctl.evaluation.targets import BENCHMARK, TargetEval, target_eval
from lessctl.files import atomic_path, write_atomic
from lessctl.outputs import artifacts, provenance
from lessctl.outputs import layout as paths
from lessctl.outputs.artifacts import STALE
from lessctl.vocab import CHECKPOINT_METHODS

log = logging.getLogger(__name__)


ABLATION_FILE = "ablation.json"
HEATMAP_FILE = "ablation_overlap.png"


# ----------------------------------------------------------------------------- subsets


def default_subsets(n_ckpts: int) -> list[tuple[int, ...]]:
    """Each checkpoint alone, each pair of neighbours, and the first with the last (LESS's ablation for 4)."""
    out: list[tuple[int, ...]] = [(i,) for i in range(1, n_ckpts + 1)]
    out += [(i, i + 1) for i in range(1, n_ckpts)]
    if n_ckpts > 2:
        out.append((1, n_ckpts))
    return out


def parse_subsets(text: str | None, n_ckpts: int) -> list[tuple[int, ...]]:
    """'1,2,12,34' -> [(1,), (2,), (1, 2), (3, 4)]: 1-based positions in checkpoints.json, one digit each
    (or joined by '+', e.g. '1+10', beyond 9 checkpoints). Order inside a subset does not matter;
    repeated subsets are dropped."""
    if text is None or not text.strip():
        return default_subsets(n_ckpts)
    out: list[tuple[int, ...]] = []
    for token in (t.strip() for t in text.split(",")):
        parts = token.split("+") if "+" in token else list(token)
        if not token or not all(p.isdigit() for p in parts):
            raise ConfigError(
                f"--subsets: {token!r} is not a subset; expected checkpoint positions such as 1,2,12 "
                "(one digit each, or joined by '+' as in 1+10)"
            )
        positions = [int(p) for p in parts]
        bad = [p for p in positions if not 1 <= p <= n_ckpts]
        if bad:
            raise ConfigError(
                f"--subsets: position {bad[0]} in {token!r} is beyond the {n_ckpts} checkpoints "
                f"in checkpoints.json (positions are 1 to {n_ckpts})"
            )
        if len(set(positions)) != len(positions):
            raise ConfigError(f"--subsets: {token!r} names a checkpoint twice")
        subset = tuple(sorted(positions))
        if subset not in out:
            out.append(subset)
    return out


# ----------------------------------------------------------------------------- the figures


def selected_keys(scored: Any, k: int) -> list[tuple[str, int]]:
    """(training set, line) of the first k rows by descending score: the rows a selection keeps."""
    from lessctl.select.match import top_order

    return [(scored.names[i], int(scored.index[i])) for i in top_order(scored.scores)[:k]]


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def kept_share(subset: set, full: set) -> float:
    """The share of the full selection that the subset's selection keeps: |subset & full| / |full|."""
    return len(subset & full) / len(full) if full else 1.0


def rank_correlation(a: Any, b: Any) -> float | None:
    """Spearman's rho between two score sets over the rows they share, joined by (training set, line).

    None when it is undefined (fewer than two shared rows, or constant scores)."""
    from scipy.stats import spearmanr

    if list(a.names) == list(b.names) and np.array_equal(a.index, b.index):  # the same pool in the same order
        x, y = np.asarray(a.scores, dtype=np.float64), np.asarray(b.scores, dtype=np.float64)
    else:
        pos = {(n, int(i)): k for k, (n, i) in enumerate(zip(b.names, b.index))}
        pairs = [
            (a.scores[k], b.scores[pos[key]])
            for k, key in enumerate(zip(a.names, (int(i) for i in a.index)))
            if key in pos
        ]
        x, y = np.asarray(pairs, dtype=np.float64).reshape(-1, 2).T
    keep = np.isfinite(x) & np.isfinite(y)  # rows without a score (no label tokens) do not rank
    x, y = x[keep], y[keep]
    if len(x) < 2:
        return None
    if np.all(x == x[0]) or np.all(y == y[0]):
        return None
    rho = float(spearmanr(x, y).statistic)
    return None if np.isnan(rho) else rho


def overlap_matrix(selections: Sequence[set]) -> np.ndarray:
    """[S, S] pairwise Jaccard overlaps."""
    n = len(selections)
    m = np.ones((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            m[i, j] = m[j, i] = jaccard(selections[i], selections[j])
    return m


def plot_overlap_heatmap(labels: Sequence[str], matrix: np.ndarray, path: Path, title: str = "") -> Path:
    """Writes a PNG heat map of `matrix` (pairwise overlaps in [0, 1]) with the values printed in the cells.

    Uses matplotlib's Agg canvas directly (no pyplot: no global state, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(
            "the overlap heat map needs matplotlib; install it with `pip install 'lessctl[plot]'`"
        ) from None

    n = len(labels)
    size = max(3.5, 0.7 * n + 2.0)
    fig = Figure(figsize=(size + 1.0, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), list(labels), rotation=45, ha="right")
    ax.set_yticks(range(n), list(labels))
    ax.set_xlabel("checkpoints (positions in checkpoints.json)")
    ax.set_ylabel("checkpoints")
    for i in range(n):
        for j in range(n):
            v = float(matrix[i, j])
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="black" if v > 0.6 else "white")
    fig.colorbar(im, ax=ax, label="Jaccard overlap of the selections")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# ----------------------------------------------------------------------------- the artifact


def ablation_path(cfg: Config, target: str) -> Path:
    return paths.selected_dir(cfg.output_dir, target) / ABLATION_FILE


def heatmap_path(cfg: Config, target: str) -> Path:
    return paths.selected_dir(cfg.output_dir, target) / HEATMAP_FILE


def save_ablation(cfg: Config, target: str, report: dict) -> Path:
    p = ablation_path(cfg, target)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(p, json.dumps(report, indent=2, default=str) + "\n")
    return p


# ----------------------------------------------------------------------------- the stage


@dataclass
class AblationResult:
    target: str
    report: dict  # what ablation.json holds
    path: Path  # ablation.json
    heatmap: Path | None
    subsets: list[dict] = field(default_factory=list)  # report["subsets"]


def _distributed() -> tuple[int, Callable[[], None]]:
    """(rank, barrier) when launched by torchrun (matching and reports then happen on rank 0 alone)."""
    from lessctl import distributed

    # rank 0 matches every subset while the others wait: longer than the default 10 minutes on a big pool
    distributed.init_process_group(hours=2)
    return distributed.rank(), distributed.barrier


def run_ablation(
    cfg: Config,
    target: str,
    *,
    subsets: str | Sequence[Sequence[int]] | None = None,
    method: str = "less",
    percentage: float | None = None,
    dim: int | None = None,
    finetune: bool = False,
    evaluate: bool = False,
    force: bool = False,
    device: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> AblationResult:
    """`lessctl ablate`: one selection per checkpoint subset from the existing stores, compared with all checkpoints.

    subsets: '1,2,12' or [(1,), (2,), (1, 2)] (1-based positions in checkpoints.json; default: each
    checkpoint, each neighbouring pair, first with last). progress(label, rows done, rows total)
    follows the matching; on_log gets the trainer's logs under `finetune`.
    """
    from lessctl.select.match import run_match
    from lessctl.training import read_checkpoints

    t0 = time.time()
    if method not in CHECKPOINT_METHODS:
        raise ConfigError(f"--method: checkpoint subsets apply to {', '.join(CHECKPOINT_METHODS)} only, got {method!r}")
    if target not in cfg.data.targets:
        raise ConfigError(
            f"--target: unknown target {target!r} (the workspace's targets: {', '.join(cfg.data.targets) or 'none'})"
        )
    if evaluate and not finetune:
        raise ConfigError("--eval: needs --finetune (each subset's selection is trained, then evaluated)")
    manifest = read_checkpoints(cfg)
    steps_all = [c["step"] for c in manifest]
    if isinstance(subsets, str) or subsets is None:
        chosen = parse_subsets(subsets, len(manifest))
    else:
        chosen = parse_subsets(",".join(paths.subset_label(s) for s in subsets), len(manifest))
    full = tuple(range(1, len(manifest) + 1))
    order = chosen + ([full] if full not in chosen else [])
    plan = target_eval(cfg, target)
    if evaluate and plan.eval_file is not None and not plan.eval_file.is_file():  # before hours of training
        raise MissingArtifactError(f"{plan.eval_file}: no such file (data.targets.{target}.eval_file)")
    if evaluate and plan.kind == BENCHMARK:
        from lessctl.evaluation.runner import check_data

        check_data(plan.task, cfg.resolve(cfg.eval.data_dir or cfg.data.data_dir))
    rank, barrier = _distributed()

    # 1. matching, from the stores on disk (rank 0 writes; the others read the files afterwards)
    entries: list[dict] = []
    keys: list[set] = []
    scored: dict[tuple[int, ...], Any] = {}
    fingerprints = {
        subset: provenance.selection_fingerprint(
            cfg, target, method, ckpts=[steps_all[p - 1] for p in subset], percentage=percentage, dim=dim,
            warmup_run=artifacts.warmup_run_id(cfg.output_dir),
        )
        for subset in order
    }  # fmt: skip
    if finetune and not force:  # refused before anything is replaced: the adapters trained on these selections stay
        for subset in order:
            sel = paths.ablation_selection(subset, method)
            state = artifacts.selection_state(cfg.output_dir, target, sel, fingerprints[subset])
            adapter = _finetune_dir(cfg, target, sel)
            if state.status == STALE and artifacts.is_adapter_dir(adapter):
                raise AlreadyExistsError(
                    f"selection {target}/{sel} was made otherwise ({state.reason}) and {adapter} was trained on it; "
                    "pass --force to match and train both again"
                )
    if rank == 0:
        for subset in order:
            label = paths.subset_label(subset)
            cb = (lambda done, total, _l=label: progress(_l, done, total)) if progress else None
            sel = paths.ablation_selection(subset, method)
            ckpts = [steps_all[p - 1] for p in subset]
            if not force and artifacts.selection_state(cfg.output_dir, target, sel, fingerprints[subset]).current:
                s = artifacts.selection_record(cfg.output_dir, target, sel) or {}
                out_dir, k = paths.selection_dir(cfg.output_dir, target, sel), int(s["selected"])
                scored[subset] = _scored_from_csv(out_dir / paths.SORTED_FILE)
                keys.append(set(selected_keys(scored[subset], k)))
                sel_file, total = out_dir / s["file"], int(s["total"])
            else:  # the ablation's own selections, one per subset: redone when not current
                res = run_match(cfg, target, method=method, ckpts=ckpts, percentage=percentage, dim=dim,
                                out_name=sel, force=True, progress=cb)  # fmt: skip
                _note_subset(res.out_dir / paths.SUMMARY_FILE, subset)
                scored[subset] = res.scored
                keys.append(set(selected_keys(res.scored, res.n_selected)))
                s, out_dir, k, sel_file, total = res.summary, res.out_dir, res.n_selected, res.file, res.total
            entries.append(
                {
                    "subset": list(subset),
                    "label": label,
                    "reference": subset == full,
                    "checkpoints": s["checkpoints"],
                    "weights": s["weights"],
                    "selection": str(out_dir.relative_to(cfg.output_dir)),
                    "file": str(sel_file),
                    "selected": k,
                    "total": total,
                    "composition": {key[3:]: v for key, v in s.items() if key.startswith("by_")},
                    "selected_score": s.get("selected_score"),
                }
            )
        ref = order.index(full)
        for subset, e, sel in zip(order, entries, keys):
            e["overlap"] = {
                "jaccard": jaccard(sel, keys[ref]),
                "kept": kept_share(sel, keys[ref]),
                "shared": len(sel & keys[ref]),
            }
            e["spearman"] = rank_correlation(scored[subset], scored[full])
        if finetune and force:  # removed once, here, so that no two ranks delete the same folder
            for subset in order:
                shutil.rmtree(_finetune_dir(cfg, target, paths.ablation_selection(subset, method)), ignore_errors=True)
    barrier()

    # 2. optional finetuning (every rank: the Trainer runs them as DDP), then evaluation (rank 0 alone), as the
    # study's ablation jobs: what is current is reused, decided as `lessctl run` decides it
    jobs = _study_jobs(cfg, target, order) if finetune else {}
    if finetune:
        for i, subset in enumerate(order):
            ft = _finetune_subset(cfg, jobs[subset][0], force=force, device=device, on_log=on_log)
            if rank == 0:
                entries[i]["finetune"] = ft
    if rank != 0:  # nothing waits for rank 0's evaluations and report
        return AblationResult(target, {}, ablation_path(cfg, target), None, [])
    if evaluate:
        for subset, e in zip(order, entries):
            e["eval"] = _evaluate_subset(cfg, plan, jobs[subset][1], device=device)

    # 3. the report and the heat map
    labels = [e["label"] for e in entries]
    matrix = overlap_matrix(keys)
    heatmap: Path | None = None
    heatmap_error = None
    try:
        shown = ["+".join(map(str, e["subset"])) + (" (all)" if e["reference"] else "") for e in entries]
        heatmap = plot_overlap_heatmap(
            shown,
            matrix,
            heatmap_path(cfg, target),
            title=f"{target}: overlap of {method} selections by checkpoint subset",
        )
    except ConfigError as exc:  # matplotlib missing: the numbers still stand
        heatmap_error = str(exc)
        log.warning("%s", exc)
    report = {
        "target": target,
        "method": method,
        "checkpoints": [
            {"position": i + 1, "step": c["step"], "epoch": c.get("epoch"), "lr_mean": c.get("lr_mean")}
            for i, c in enumerate(manifest)
        ],
        "reference": paths.subset_label(full),
        "subsets": entries,
        "overlap_matrix": {"labels": labels, "jaccard": [[round(float(v), 6) for v in row] for row in matrix]},
        "heatmap": str(heatmap) if heatmap else None,
        **({"heatmap_error": heatmap_error} if heatmap_error else {}),
        "finetune": finetune,
        "eval": evaluate,
        "lessctl_version": __version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.time() - t0, 3),
    }
    path = save_ablation(cfg, target, report)
    return AblationResult(target, report, path, heatmap, entries)


def _note_subset(summary_path: Path, subset: tuple[int, ...]) -> None:
    """Adds the subset's positions to the selection's summary.json (run_match names the checkpoints by step)."""
    from lessctl.outputs.readback import read_summary

    summary = read_summary(summary_path)
    summary["checkpoint_positions"] = list(subset)
    write_atomic(summary_path, json.dumps(summary, indent=2, default=str))


def _finetune_dir(cfg: Config, target: str, sel_name: str) -> Path:
    return paths.finetune_dir(cfg.output_dir, paths.finetune_name(target, sel_name))


def _scored_from_csv(path: Path) -> Any:
    """Every pool row's score as a selection's sorted.csv keeps it (rounded to 6 decimals), in its order."""
    from lessctl.select.match import read_sorted_csv
    from lessctl.select.scores import Scored

    rows = read_sorted_csv(path)
    return Scored(
        [r[0] for r in rows], np.array([r[1] for r in rows], dtype=np.int64), np.array([r[2] for r in rows], float)
    )


def _study_jobs(cfg: Config, target: str, order: list[tuple[int, ...]]) -> dict[tuple[int, ...], tuple[Any, Any]]:
    """{subset: (finetune job, eval job)} of the study's ablation branch for this target (lessctl.study.graph)."""
    from lessctl.study.graph import expand
    from lessctl.study.plan import Plan

    jobs = expand(cfg, Plan(("less",), (), ablation=tuple(order), study=True))
    mine = [j for j in jobs if j.target == target and j.branch == "ablation"]
    out = {}
    for subset in order:
        ft = next(j for j in mine if j.stage == "finetune" and j.subset == subset)
        ev = next(j for j in mine if j.stage == "eval" and j.after == (ft.key,))
        out[subset] = (ft, ev)
    return out


def _finetune_subset(cfg: Config, job: Any, *, force: bool, device: str | None, on_log) -> dict:
    """Trains finetune/<target>-<selection>/ on the subset's selection, or reuses it when it is current; an
    adapter made from another selection or settings is replaced only with `force` (the refusal says why)."""
    from lessctl.study.graph import job_state
    from lessctl.study.pipeline import run_job

    out = paths.finetune_dir(cfg.output_dir, job.model)
    state = job_state(cfg, job)
    if state.current:  # (with force, step 1 removed it)
        return {"name": job.model, "output_dir": str(out), "reused": True, "seconds": 0.0}
    if state.status == STALE and not force:
        raise AlreadyExistsError(
            f"{out} holds an adapter made otherwise ({state.reason}); pass --force to train it again"
        )
    t0 = time.time()
    run_job(cfg, job, device, _Logged(on_log))
    run = artifacts.adapter_record(cfg.output_dir, job.model) or {}
    return {
        "name": job.model,
        "output_dir": str(out),
        "reused": False,
        "seconds": round(time.time() - t0, 1),
        "examples": (run.get("counts") or {}).get("subset"),
    }


class _Logged:
    """run_job's progress, handed on as the trainer's logs (`on_log`)."""

    def __init__(self, on_log):
        self._on_log = on_log

    def update(self, completed=None, total=None, status=None, **kw) -> None:
        if self._on_log is not None and completed is not None and total:
            rec = {"step": completed, "max_steps": total}
            if isinstance(status, str) and status.startswith("loss "):
                rec["loss"] = float(status.split()[1])
            self._on_log(rec)


def _evaluate_subset(cfg: Config, plan: TargetEval, job: Any, *, device: str | None) -> dict:
    """The score of one finetuned selection on the target's benchmark or eval_file, or why there is none; an
    earlier result is reused while it is current (its adapter not trained again, the same eval settings)."""
    if plan.task is None:
        return {"status": "not applicable", "reason": plan.reason}
    from lessctl.study.pipeline import run_job

    report = run_job(cfg, job, device)[0]
    rec = artifacts.eval_record(cfg.output_dir, job.model, job.task) or {}
    return {
        "status": "reused" if report.status == "skipped" else "done",
        "task": plan.task,
        "metric": rec.get("metric"),
        "score": artifacts.headline_score(rec),
        "eval_json": str(paths.eval_json(cfg.output_dir, job.model, job.task)),
    }
