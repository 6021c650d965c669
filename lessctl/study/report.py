"""`lessctl report`: one self-contained HTML page over what a workspace holds, with its figures beside it.

Per target: the distribution of LESS scores with the selection cut, each method's selection by training
file and by subtask (family, dataset or source task, whichever the data carry), the overlap between the
methods' selections; for the workspace: the checkpoint weights, the ablation heat maps `ablate` drew, and
the results table when `eval` ran. Figures are PNG files in the report folder, referenced by index.html.
"""

from __future__ import annotations

import html
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lessctl.config import Config
from lessctl.errors import ConfigError, MissingArtifactError
from lessctl.evaluation.results import read_results
from lessctl.files import atomic_path, write_atomic
from lessctl.outputs import layout as paths
from lessctl.outputs.readback import read_sorted_csv, read_summary
from lessctl.select.match import SUMMARY_KEYS
from lessctl.study.ablation import HEATMAP_FILE
from lessctl.training.runs import read_checkpoints
from lessctl.vocab import METHODS


@dataclass
class ReportResult:
    path: Path
    figures: list[Path] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)


@dataclass
class _Selection:
    method: str
    summary: dict
    scores: list[float]  # every pool example's score, best first
    chosen: set[tuple[str, int]]  # (training file, line) of the selected examples


def _selections(cfg: Config) -> dict[str, dict[str, _Selection]]:
    """target -> method -> its selection, for every selection `match` wrote (methods in vocab order)."""
    root = cfg.output_dir / "selected"
    out: dict[str, dict[str, _Selection]] = {}
    for tdir in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        methods = sorted(
            (d for d in tdir.iterdir() if (d / paths.SUMMARY_FILE).is_file() and (d / paths.SORTED_FILE).is_file()),
            key=lambda d: (METHODS.index(d.name) if d.name in METHODS else len(METHODS), d.name),
        )
        for d in methods:
            summary = read_summary(d / paths.SUMMARY_FILE)
            rows = read_sorted_csv(d / paths.SORTED_FILE)
            k = int(summary.get("selected", 0))
            sel = _Selection(d.name, summary, [r[2] for r in rows], {(r[0], r[1]) for r in rows[:k]})
            out.setdefault(tdir.name, {})[d.name] = sel
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        matplotlib.rcParams["text.parse_math"] = False  # labels are names from the data: plain text, `$` and all
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(f"lessctl report draws with matplotlib ({exc}): pip install 'lessctl[plot]'") from exc
    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _scores_figure(plt, target: str, sel: _Selection, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.hist(sel.scores, bins=min(60, max(10, len(sel.scores) // 20)), color="#6b8fb5")
    k = int(sel.summary.get("selected", 0))
    if 0 < k <= len(sel.scores):
        cut = sel.scores[k - 1]
        ax.axvline(cut, color="#c0392b", linewidth=1.5)
        ax.text(cut, ax.get_ylim()[1] * 0.92, f" top {k}", color="#c0392b", fontsize=9)
    ax.set_xlabel(f"{sel.method} score")
    ax.set_ylabel("pool examples")
    ax.set_title(f"{target}: {sel.method} scores and the selection cut", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _group_key(sels: dict[str, _Selection]) -> str | None:
    """The subtask key the selections' summaries count by (family, dataset or source task), if any."""
    for key in SUMMARY_KEYS:
        if any(f"by_{key}" in s.summary for s in sels.values()):
            return key
    return None


def _composition_figure(plt, target: str, sels: dict[str, _Selection], path: Path) -> Path:
    key = _group_key(sels)
    panels = [("by_train_set", "training file")] + ([(f"by_{key}", key.replace("_", " "))] if key else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 1.8 + 0.45 * len(sels)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, (field_name, label) in zip(axes[0], panels):
        names = sorted({n for s in sels.values() for n in s.summary.get(field_name, {})}, key=str)
        methods = list(sels)
        left = [0.0] * len(methods)
        for i, name in enumerate(names):
            counts = [float(sels[m].summary.get(field_name, {}).get(name, 0)) for m in methods]
            ax.barh(methods, counts, left=left, color=cmap(i % 20), label=str(name))
            left = [a + b for a, b in zip(left, counts)]
        ax.invert_yaxis()
        ax.set_xlabel("selected examples")
        ax.set_title(f"{target}: selection by {label}", fontsize=10)
        ax.legend(
            fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=min(6, max(1, len(names))), frameon=False
        )
    fig.tight_layout()
    return _save(fig, path)


def _overlap_figure(plt, target: str, sels: dict[str, _Selection], path: Path) -> Path:
    methods = list(sels)
    n = len(methods)
    matrix = [[0.0] * n for _ in range(n)]
    for i, a in enumerate(methods):
        for j, b in enumerate(methods):
            union = sels[a].chosen | sels[b].chosen
            matrix[i][j] = len(sels[a].chosen & sels[b].chosen) / len(union) if union else 1.0
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * n, 1.2 + 0.8 * n))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(n), methods)
    ax.set_yticks(range(n), methods)
    for i in range(n):
        for j in range(n):
            ax.text(
                j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", color="black" if matrix[i][j] < 0.6 else "white"
            )
    ax.set_title(f"{target}: Jaccard overlap of selections", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)


def _weights_figure(plt, checkpoints: list[dict], path: Path) -> Path:
    total = sum(float(c.get("lr_mean", 0)) for c in checkpoints) or 1.0
    fig, ax = plt.subplots(figsize=(5.2, 2.8))
    ax.bar(
        [str(c["step"]) for c in checkpoints],
        [float(c.get("lr_mean", 0)) / total for c in checkpoints],
        color="#6b8fb5",
    )
    ax.set_xlabel("warmup checkpoint (step)")
    ax.set_ylabel("weight (mean learning rate, normalised)")
    ax.set_title("checkpoint weights of LESS's score", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    return f'<figure><img src="{html.escape(path.name)}" alt="{html.escape(alt)}"></figure>'


_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
p.meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; } th { background: #f3f5f8; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 0.8em 0; } img { max-width: 100%; border: 1px solid #eee; }
.row { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
"""


def build_report(cfg: Config, out_dir: Path | None = None) -> ReportResult:
    """Writes `<output_dir>/report/index.html` (or `out_dir`) and its figures; returns what it wrote."""
    sels = _selections(cfg)
    if not sels:
        raise MissingArtifactError(
            f"no selections in {cfg.output_dir / 'selected'}; run `lessctl match` first (the report shows them)"
        )
    plt = _pyplot()
    out = Path(out_dir) if out_dir is not None else cfg.output_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    res = ReportResult(out / "index.html", targets=list(sels))
    parts = [
        f"<h1>lessctl report: {html.escape(cfg.experiment.name)}</h1>",
        f'<p class="meta">workspace {html.escape(str(cfg.output_dir))}; base model '
        f"{html.escape(str(cfg.model.name_or_path))}</p>",
    ]
    ckpt_file = paths.checkpoints_file(cfg.output_dir)
    if ckpt_file.is_file():
        checkpoints = read_checkpoints(cfg)
        if checkpoints:
            res.figures.append(_weights_figure(plt, checkpoints, out / "checkpoint-weights.png"))
            parts += ["<h2>Warmup checkpoints</h2>", _img(res.figures[-1], "checkpoint weights")]
    for target, by_method in sels.items():
        parts.append(f"<h2>Target: {html.escape(target)}</h2>")
        rows = []
        for m, s in by_method.items():
            sc = s.summary.get("selected_score", {})
            rows.append(
                [
                    m,
                    s.summary.get("selected"),
                    s.summary.get("total"),
                    *(f"{sc[k]:.4f}" if isinstance(sc.get(k), (int, float)) else "" for k in ("min", "median", "max")),
                ]
            )
        parts.append(_table(["method", "selected", "pool", "selected score min", "median", "max"], rows))
        row = []
        if "less" in by_method:
            res.figures.append(_scores_figure(plt, target, by_method["less"], out / f"scores-{target}.png"))
            row.append(_img(res.figures[-1], f"{target} LESS scores"))
        if len(by_method) > 1:
            res.figures.append(_overlap_figure(plt, target, by_method, out / f"overlap-{target}.png"))
            row.append(_img(res.figures[-1], f"{target} overlap"))
        parts.append('<div class="row">' + "".join(row) + "</div>")
        res.figures.append(_composition_figure(plt, target, by_method, out / f"composition-{target}.png"))
        parts.append(_img(res.figures[-1], f"{target} composition"))
        heatmap = paths.selected_dir(cfg.output_dir, target) / HEATMAP_FILE
        if heatmap.is_file():
            copy = out / f"ablation-{target}.png"
            shutil.copyfile(heatmap, copy)
            res.figures.append(copy)
            parts += ["<h3>Checkpoint-subset ablation</h3>", _img(copy, f"{target} ablation overlap")]
    if "study" in cfg.given:  # the study's tables, as `lessctl results` prints them
        from lessctl.study.results import study_results, tables

        for title, columns, rows in tables(study_results(cfg)):
            parts += [f"<h2>{html.escape(title)}</h2>", _table(columns, rows)]
    results = read_results(cfg.output_dir)
    if results:
        parts.append("<h2>Evaluation results</h2>")
        rows = [
            [
                r.get("model", ""),
                r.get("task", ""),
                r.get("metric", ""),
                f"{r['score']:.2f}" if isinstance(r.get("score"), (int, float)) else r.get("score", ""),
            ]
            for r in results
        ]
        parts.append(_table(["model", "task", "metric", "score"], rows))
    page = (
        f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>lessctl report: "
        f"{html.escape(cfg.experiment.name)}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
    write_atomic(res.path, page)
    return res
