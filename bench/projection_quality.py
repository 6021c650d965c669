#!/usr/bin/env python
"""Selection quality of the count-sketch projection against LESS's Rademacher projection, on real data.

The yardstick: two Rademacher projections (TRAK's BasicProjector) with different seeds do not select
the same top 5% either. The cheaper count sketch is good enough when its selection overlaps the
seed-0 Rademacher selection at least as much as the seed-1 Rademacher selection does. All projections
(and the unprojected, exact-cosine selection) start from the same unprojected features, computed once:

1. a workspace (`--out`): the tiny preset's model and tokenizer; pool = dolly + oasst1 + the first
   `--cot-lines` lines of cot (a file inside `--out`); targets mmlu, bbh, tydiqa from the shared data
   folder; LoRA r = `--lora-r` (alpha 4r); warmup on 20% of the pool for `--epochs` epochs;
2. at the last checkpoint, every pool example's adam feature and every target example's sgd feature,
   unprojected ([N, P] float32 in memory, P = the LoRA gradient dimension);
3. the projections: Rademacher seeds 0 and 1, count sketch seeds 0 and 1, identity (exact cosines), and
   a sweep over seeds 0..--seeds-1 of both (the single-seed comparison is noisy);
   rows L2-normalized and rounded to float16 as the gradient store keeps them; LESS scores as
   `lessctl.select.scores` computes them (cosines, mean per subtask, max over subtasks), top 5%;
4. per target: Jaccard and kept share of the reference selection, Spearman of the score vectors, the
   verdict, and self-checks that must be exactly 1.0.

    python bench/projection_quality.py [--out DIR] [--cot-lines 3000] [--dim 1024] [--lora-r 64] \
        [--epochs 1] [--max-seq-length 4096] [--seeds 8] [--device DEV] [--json FILE]

See bench/README.md ("projection_quality.py").
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

PERCENTAGE = 0.05
TARGETS = ("mmlu", "bbh", "tydiqa")
# The methods of the main comparison (seeds 0 and 1); "exact" is the identity (no projection).
MAIN_METHODS = ("rademacher0", "rademacher1", "sketch0", "sketch1", "exact")
# (method, reference): the comparisons reported for every target
COMPARISONS = [
    ("rademacher1", "rademacher0"),  # the yardstick: another seed of the same projection
    ("sketch0", "rademacher0"),
    ("sketch1", "rademacher0"),
    ("exact", "rademacher0"),
    ("sketch1", "sketch0"),  # the sketch's own seed-to-seed agreement
    ("rademacher0", "exact"),
    ("rademacher1", "exact"),
    ("sketch0", "exact"),
    ("sketch1", "exact"),
]
FEATURE_BYTES_WARN = 2 << 30
ROWS_PER_CALL = 512  # rows per gradient window and per projection call (bounds the temporaries)


def log(msg: str) -> None:
    print(f"[projection_quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def shared_data_dir() -> Path:
    return Path(os.environ.get("LESSCTL_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


from lessctl.grads.projection.base import Projector  # noqa: E402 (after the sys.path line)


class IdentityProjector(Projector):
    """No projection: the features themselves (the FeatureCollector hands over float16 rows)."""

    kind = "identity"

    def __init__(self, grad_dim: int):
        super().__init__(grad_dim, grad_dim, "cpu")

    def project(self, x):
        return x.float()

    @property
    def attrs(self) -> dict:
        return {"kind": self.kind, "grad_dim": self.grad_dim}


# ----------------------------------------------------------------------------- workspace


def build_workspace(out: Path, data_dir: Path, args) -> tuple[Any, bool]:
    """(config, settings changed since the last run) for the real-data workspace in `out`."""
    from lessctl.config import CONFIG_NAME, load_config, to_toml
    from lessctl.workspace import init_workspace, preset_config

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "model" / "config.json").is_file():
        log(f"building the tiny model and tokenizer in {out / 'model'}")
        init_workspace(out, "tiny", force=True)
    train_dir = data_dir / "train" / "processed"
    cot_src = train_dir / "cot" / "cot_data.jsonl"
    with open(cot_src, encoding="utf-8") as fh:
        lines = []
        for line in fh:
            if len(lines) >= args.cot_lines:
                break
            lines.append(line if line.endswith("\n") else line + "\n")
    if len(lines) < args.cot_lines:
        log(f"{cot_src} has only {len(lines)} lines (asked for {args.cot_lines})")
    cot_file = out / "pool" / f"cot_first{len(lines)}.jsonl"
    cot_file.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(lines)
    if not cot_file.is_file() or cot_file.read_text(encoding="utf-8") != text:
        cot_file.write_text(text, encoding="utf-8")

    raw = preset_config("tiny")
    raw["model"]["max_seq_length"] = args.max_seq_length
    raw["lora"]["r"], raw["lora"]["alpha"] = args.lora_r, 4 * args.lora_r
    raw["data"] = {
        "train": {
            "dolly": str(train_dir / "dolly" / "dolly_data.jsonl"),
            "oasst1": str(train_dir / "oasst1" / "oasst1_data.jsonl"),
            "cot": str(cot_file.relative_to(out)),
        },
        "targets": {t: t for t in TARGETS},
        "data_dir": str(data_dir),
    }
    raw["warmup"]["percentage"] = 0.2
    raw["warmup"]["epochs"] = args.epochs
    raw["grads"]["dims"] = [args.dim]
    raw["grads"]["projector"] = "basic"
    toml_text = (
        "# Written by bench/projection_quality.py: the tiny model on a real-data pool and LESS's targets.\n\n"
        + to_toml(raw)
    )
    path = out / CONFIG_NAME
    changed = not path.is_file() or path.read_text() != toml_text
    path.write_text(toml_text)
    return load_config(path), changed


def warmup(cfg, changed: bool, device: str) -> dict:
    from lessctl.training import checkpoints_path, run_warmup

    if checkpoints_path(cfg).is_file() and not changed:
        log("warmup: reusing the checkpoints in " + str(checkpoints_path(cfg).parent))
        return {"reused": True, "seconds": 0.0}
    t0 = time.time()
    log("warmup: training (LoRA on 20% of the pool)" + (" again: the settings changed" if changed else ""))
    res = run_warmup(cfg, force=True, device=device)
    secs = time.time() - t0
    log(f"warmup: {len(res.checkpoints)} checkpoint(s) in {secs:.1f} s")
    return {"reused": False, "seconds": round(secs, 2), "counts": res.counts}


# ----------------------------------------------------------------------------- features


def unprojected_features(cfg, device: str) -> dict:
    """Adam features of the pool and sgd features of each target at the last checkpoint, unprojected."""
    import torch

    from lessctl.grads.adam import load_adam_state
    from lessctl.grads.collector import FeatureCollector
    from lessctl.grads.engine import PerExampleGradients
    from lessctl.grads.stage import data_sets
    from lessctl.models import load_adapter_model
    from lessctl.training import checkpoint_dir, read_checkpoints

    manifest = read_checkpoints(cfg)
    step = manifest[-1]["step"]
    ckpt = checkpoint_dir(cfg, step)
    base = str(cfg.resolve(cfg.model.name_or_path))
    model, tok = load_adapter_model(ckpt, base=base, dtype=cfg.model.dtype, device=device, trainable=True)
    model.eval()  # no dropout, as the grads stage
    peg = PerExampleGradients(model)
    P = peg.grad_dim
    adam = load_adam_state(ckpt, peg.params, device)
    ident = {P: IdentityProjector(P)}

    sets = data_sets(cfg, None, None, None)
    encoded = {ds.name: ds.encode(cfg, tok) for ds in sets}
    n_pool = sum(len(encoded[ds.name]) for ds in sets if ds.role == "train")
    n_target = sum(len(encoded[ds.name]) for ds in sets if ds.role == "target")
    nbytes = (n_pool + n_target) * P * 4
    log(
        f"checkpoint {step}: P = {P:,} LoRA parameters; N = {n_pool:,} pool + {n_target:,} target examples; "
        f"unprojected float32 features: {nbytes / 2**30:.2f} GiB"
    )
    if nbytes > FEATURE_BYTES_WARN:
        log("warning: the features exceed 2 GiB; lower --cot-lines or --lora-r if memory is short")

    pool = np.zeros((n_pool, P), dtype=np.float32)
    pool_names: list[str] = []
    pool_sizes: dict[str, int] = {}
    targets: dict[str, dict] = {}
    zero_rows: dict[str, int] = {}
    eff_coords: dict[str, dict] = {}
    t0 = time.time()
    row = 0
    for ds in sets:
        enc = encoded[ds.name]
        coll = FeatureCollector(
            peg,
            ident,
            ds.grad_type,
            adam if ds.grad_type == "adam" else None,
            pad_id=tok.pad_token_id,
            batch_tokens=cfg.grads.batch_tokens,
        )
        dest = pool[row : row + len(enc)] if ds.role == "train" else np.zeros((len(enc), P), dtype=np.float32)
        zero = 0
        for i in range(0, len(enc), ROWS_PER_CALL):
            window = enc[i : i + ROWS_PER_CALL]
            got = coll([e.input_ids for e in window], [e.labels for e in window])
            dest[i : i + len(window)] = got.features[P]
            zero += got.zero_label_rows
        zero_rows[ds.name] = zero
        eff_coords[ds.name] = effective_coordinates(dest)
        if ds.role == "train":
            pool_names += [ds.name] * len(enc)
            pool_sizes[ds.name] = len(enc)
            row += len(enc)
        else:
            targets[ds.name] = {"features": dest, "subtasks": [e.meta["subtask"] for e in enc]}
        log(
            f"  {ds.name} ({ds.role}, {ds.grad_type}): {len(enc)} examples, {zero} without label tokens, "
            f"{time.time() - t0:.1f} s so far"
        )
        if ds.role == "target" and zero > 0.1 * len(enc):
            log(
                f"warning: {zero} of {len(enc)} {ds.name} examples lost their completion to --max-seq-length "
                f"{cfg.model.max_seq_length}; their features are zero and say nothing about the projections"
            )
    peg.remove()
    del model
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "step": step,
        "checkpoint": str(ckpt),
        "P": P,
        "pool": pool,
        "pool_names": pool_names,
        "pool_sizes": pool_sizes,
        "targets": targets,
        "zero_label_rows": zero_rows,
        "effective_coordinates": eff_coords,
        "feature_bytes": nbytes,
        "seconds": round(time.time() - t0, 2),
    }


def effective_coordinates(X: np.ndarray) -> dict:
    """(sum x^2)^2 / sum x^4 per nonzero row (P for a flat row, 1 for a single spike): median, min, max."""
    vals = []
    for i in range(0, X.shape[0], ROWS_PER_CALL):
        x2 = X[i : i + ROWS_PER_CALL].astype(np.float64) ** 2
        s2, s4 = x2.sum(axis=1), (x2 * x2).sum(axis=1)
        vals.append(s2[s4 > 0] ** 2 / s4[s4 > 0])
    v = np.concatenate(vals) if vals else np.zeros(0)
    if not len(v):
        return {"median": None, "min": None, "max": None}
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


# ----------------------------------------------------------------------------- projection and scores


def method_spec(method: str) -> tuple[str, int | None]:
    """(projector kind, seed) of a method name: rademacherS, sketchS or exact."""
    if method == "exact":
        return "identity", None
    for family, kind in (("rademacher", "basic"), ("sketch", "sketch")):
        if method.startswith(family):
            return kind, int(method[len(family) :])
    raise ValueError(method)


def make(method: str, P: int, dim: int, device: str):
    from lessctl.grads.projection.choose import make_projector

    kind, seed = method_spec(method)
    if kind == "identity":
        return IdentityProjector(P)
    return make_projector(kind, P, dim, device, seed=seed)


def project_rows(proj, X: np.ndarray, device: str, rows: int = ROWS_PER_CALL) -> np.ndarray:
    import torch

    out = np.empty((X.shape[0], proj.dim), dtype=np.float32)
    for i in range(0, X.shape[0], rows):
        x = torch.from_numpy(X[i : i + rows]).to(device)
        out[i : i + rows] = proj.project(x).float().cpu().numpy()
    return out


def normalize(x: np.ndarray) -> np.ndarray:
    """Unit rows (zero rows stay zero), rounded to float16 as the gradient store keeps them."""
    out = np.empty(x.shape, dtype=np.float32)
    for i in range(0, x.shape[0], ROWS_PER_CALL):
        rows = x[i : i + ROWS_PER_CALL]
        norms = np.linalg.norm(rows.astype(np.float64), axis=1)
        unit = rows / np.where(norms > 0, norms, 1).astype(np.float32)[:, None]
        out[i : i + ROWS_PER_CALL] = unit.astype(np.float16)
    return out


def less_scores(Xn: np.ndarray, Yn: np.ndarray, subtasks: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(cosines [N, M], LESS scores [N]) as lessctl.select.scores computes them for one checkpoint (weight 1)."""
    from lessctl.select.scores import aggregate, normalize_weights, subtask_matrix

    w = normalize_weights([1.0])
    _, A = subtask_matrix(subtasks)
    cos = float(w[0]) * (Xn @ Yn.T)
    scores = aggregate(cos, A).astype(np.float64)
    scores[~Xn.any(axis=1)] = np.nan  # a zero row (no label tokens) has no score and is never selected
    return cos, scores


def selected(scores: np.ndarray) -> np.ndarray:
    from lessctl.select.match import n_selected, top_order

    k = n_selected(len(scores), PERCENTAGE, None)
    return top_order(scores)[:k]


def overlap(sel: np.ndarray, ref: np.ndarray) -> dict:
    a, b = set(int(i) for i in sel), set(int(i) for i in ref)
    inter, union = len(a & b), len(a | b)
    return {"intersection": inter, "jaccard": inter / union if union else 1.0, "kept": inter / len(b) if b else 1.0}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    keep = np.isfinite(a) & np.isfinite(b)  # rows without label tokens have no score (NaN)
    a, b = a[keep], b[keep]
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None  # a constant score vector (e.g. a target whose every example lost its label tokens)
    return float(spearmanr(a, b).statistic)


def _stats(xs: list[float]) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "values": [float(x) for x in a],
    }


def evaluate(feats: dict, dim: int, device: str, n_seeds: int = 2) -> dict:
    """Every method's scores and selections per target, the comparisons, the seed sweep and the self-checks."""
    P = feats["P"]
    pool, targets = feats["pool"], feats["targets"]
    extra = [f"{fam}{s}" for fam in ("rademacher", "sketch") for s in range(2, n_seeds)]
    order = ["exact", *MAIN_METHODS[:-1], *extra]  # exact first: the others' cosine errors are taken against it
    methods: dict[str, dict] = {}
    exact_cos: dict[str, np.ndarray] = {}
    err: dict[str, dict[str, dict]] = {t: {} for t in targets}
    scores: dict[str, dict[str, np.ndarray]] = {}
    for m in order:
        t0 = time.time()
        proj = make(m, P, dim, device)
        t_build = time.time() - t0
        Xn = normalize(project_rows(proj, pool, device))
        t_pool = time.time() - t0 - t_build
        scores[m] = {}
        for t, tf in targets.items():
            cos, scores[m][t] = less_scores(Xn, normalize(project_rows(proj, tf["features"], device)), tf["subtasks"])
            if m == "exact":
                exact_cos[t] = cos
            else:
                d = np.abs(cos - exact_cos[t])
                err[t][m] = {"mean": float(d.mean()), "p99": float(np.quantile(d, 0.99)), "max": float(d.max())}
        kind, seed = method_spec(m)
        methods[m] = {
            "kind": kind,
            "seed": seed,
            "dim": proj.dim,
            "build_seconds": round(t_build, 3),
            "project_pool_seconds": round(t_pool, 3),
            "attrs": getattr(proj, "attrs", {}),
        }
        log(f"  {m}: built in {t_build:.2f} s, pool projected in {t_pool:.2f} s")
        del proj, Xn

    # Self-checks: the exact selection again from a second identity pass in other row chunks, and a fresh
    # seed-0 Rademacher projector: both must reproduce their selections exactly.
    reruns = {}
    for name, m, rows in (
        ("exact_vs_exact_rerun", "exact", 97),
        ("rademacher0_vs_rademacher0_rerun", "rademacher0", 211),
    ):
        proj = make(m, P, dim, device)
        Xn = normalize(project_rows(proj, pool, device, rows=rows))
        reruns[name] = (
            m,
            {
                t: less_scores(Xn, normalize(project_rows(proj, tf["features"], device, rows=rows)), tf["subtasks"])[1]
                for t, tf in targets.items()
            },
        )
        del proj, Xn

    out: dict[str, dict] = {}
    N = pool.shape[0]
    for t, tf in targets.items():
        sel = {m: selected(scores[m][t]) for m in order}
        k = len(sel["rademacher0"])
        comps = {f"{a}_vs_{b}": overlap(sel[a], sel[b]) for a, b in COMPARISONS}
        sp0 = {m: spearman(scores[m][t], scores["rademacher0"][t]) for m in MAIN_METHODS if m != "rademacher0"}
        spx = {m: spearman(scores[m][t], scores["exact"][t]) for m in MAIN_METHODS if m != "exact"}
        yard = comps["rademacher1_vs_rademacher0"]
        informative = int((np.abs(tf["features"]).sum(axis=1) > 0).sum())
        verdict: dict[str, Any] = {}
        for s in ("sketch0", "sketch1"):
            c = comps[f"{s}_vs_rademacher0"]
            verdict[s] = {"jaccard": c["jaccard"] >= yard["jaccard"], "kept": c["kept"] >= yard["kept"]}
        verdict["informative"] = informative > 0
        verdict["holds"] = informative > 0 and all(verdict[s]["jaccard"] for s in ("sketch0", "sketch1"))

        # The seed sweep: every Rademacher seed 1..K-1 and every sketch seed 0..K-1 against rademacher0, and
        # every seed of both against the exact selection (which depends on no random draw).
        rad, sk = [f"rademacher{s}" for s in range(n_seeds)], [f"sketch{s}" for s in range(n_seeds)]
        sweep = {
            "rademacher_vs_rademacher0": _stats([overlap(sel[m], sel["rademacher0"])["jaccard"] for m in rad[1:]]),
            "sketch_vs_rademacher0": _stats([overlap(sel[m], sel["rademacher0"])["jaccard"] for m in sk]),
            "rademacher_vs_exact": _stats([overlap(sel[m], sel["exact"])["jaccard"] for m in rad]),
            "sketch_vs_exact": _stats([overlap(sel[m], sel["exact"])["jaccard"] for m in sk]),
            "rademacher_spearman_vs_exact": _stats([spearman(scores[m][t], scores["exact"][t]) or 0.0 for m in rad]),
            "sketch_spearman_vs_exact": _stats([spearman(scores[m][t], scores["exact"][t]) or 0.0 for m in sk]),
            "rademacher_cosine_error": _stats([err[t][m]["mean"] for m in rad]),
            "sketch_cosine_error": _stats([err[t][m]["mean"] for m in sk]),
        }
        for ref in ("rademacher0", "exact"):
            a, b = sweep[f"sketch_vs_{ref}"], sweep[f"rademacher_vs_{ref}"]
            n_a, n_b = len(a["values"]), len(b["values"])
            se = float(np.sqrt(a["std"] ** 2 / n_a + b["std"] ** 2 / n_b)) if min(n_a, n_b) > 1 else None
            diff = a["mean"] - b["mean"]
            sweep[f"difference_vs_{ref}"] = {
                "sketch_minus_rademacher": diff,
                "standard_error": se,
                "within_2_se": None if se is None else abs(diff) <= 2 * se,
            }
        sweep["holds_vs_rademacher0"] = informative > 0 and (
            sweep["sketch_vs_rademacher0"]["mean"] >= sweep["rademacher_vs_rademacher0"]["mean"]
        )
        sweep["holds_vs_exact"] = informative > 0 and (
            sweep["sketch_vs_exact"]["mean"] >= sweep["rademacher_vs_exact"]["mean"]
        )
        self_check = {}
        for name, (m, rerun) in reruns.items():
            self_check[name] = {
                **overlap(selected(rerun[t]), sel[m]),
                "max_abs_score_diff": float(np.nanmax(np.abs(rerun[t] - scores[m][t]))),
            }
        out[t] = {
            "examples": len(tf["subtasks"]),
            "subtasks": len(set(tf["subtasks"])),
            "examples_with_label_tokens": informative,
            "total": N,
            "n_selected": k,
            "chance_kept": k / N if N else 0.0,
            "chance_jaccard": k / (2 * N - k) if N else 0.0,
            "overlap": comps,
            "spearman_vs_rademacher0": sp0,
            "spearman_vs_exact": spx,
            "cosine_abs_error_vs_exact": err[t],
            "sketch_at_least_yardstick": verdict,
            "seed_sweep": {"seeds": n_seeds, **sweep},
            "self_check": self_check,
        }
    return {"methods": methods, "targets": out}


# ----------------------------------------------------------------------------- report


def table(report: dict) -> str:
    T = report["targets"]
    lines = []
    k = next(iter(T.values()))
    lines.append(
        f"Top {PERCENTAGE:.0%} selections: {k['n_selected']} of {k['total']} pool examples; "
        f"P = {report['sizes']['P']:,}, D = {report['settings']['dim']}; target examples with label tokens: "
        + ", ".join(f"{t} {v['examples_with_label_tokens']}/{v['examples']}" for t, v in T.items())
    )
    lines.append("")
    lines.append("Overlap with the rademacher0 selection: Jaccard (share of rademacher0's selection kept)")
    lines.append("")
    lines.append("| target | rademacher1 (yardstick) | sketch0 | sketch1 | exact | chance | sketch >= yardstick |")
    lines.append("|---|---|---|---|---|---|---|")

    def cells(o: dict):
        """One table cell per overlap key: 'Jaccard (share kept)'."""
        return lambda k: f"{o[k]['jaccard']:.3f} ({o[k]['kept']:.3f})"

    for t, v in T.items():
        cell = cells(v["overlap"])
        ver = v["sketch_at_least_yardstick"]
        if not ver["informative"]:
            yes = "n/a: no target example kept a label token"
        else:
            yes = (
                "yes"
                if ver["holds"]
                else ("no (" + ", ".join(s for s in ("sketch0", "sketch1") if not ver[s]["jaccard"]) + ")")
            )
        lines.append(
            f"| {t} | {cell('rademacher1_vs_rademacher0')} | {cell('sketch0_vs_rademacher0')} | "
            f"{cell('sketch1_vs_rademacher0')} | {cell('exact_vs_rademacher0')} | "
            f"{v['chance_jaccard']:.3f} ({v['chance_kept']:.3f}) | {yes} |"
        )
    lines.append("")
    lines.append("Overlap with the exact (unprojected cosine) selection: Jaccard (share of the exact selection kept)")
    lines.append("")
    lines.append("| target | rademacher0 | rademacher1 | sketch0 | sketch1 | sketch1 vs sketch0 |")
    lines.append("|---|---|---|---|---|---|")
    for t, v in T.items():
        cell = cells(v["overlap"])
        lines.append(
            f"| {t} | {cell('rademacher0_vs_exact')} | {cell('rademacher1_vs_exact')} | "
            f"{cell('sketch0_vs_exact')} | {cell('sketch1_vs_exact')} | {cell('sketch1_vs_sketch0')} |"
        )
    lines.append("")
    lines.append("Spearman of the full score vectors vs rademacher0 [vs exact]; mean |cosine error| vs exact")
    lines.append("")
    lines.append("| target | rademacher1 | sketch0 | sketch1 | exact | cos err rad0 / rad1 / sk0 / sk1 |")
    lines.append("|---|---|---|---|---|---|")
    for t, v in T.items():
        s0, sx, e = v["spearman_vs_rademacher0"], v["spearman_vs_exact"], v["cosine_abs_error_vs_exact"]
        num = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
        cell = lambda m: f"{num(s0[m])} [{num(sx[m])}]"  # noqa: E731
        errs = " / ".join(f"{e[m]['mean']:.4f}" for m in ("rademacher0", "rademacher1", "sketch0", "sketch1"))
        lines.append(
            f"| {t} | {cell('rademacher1')} | {cell('sketch0')} | {cell('sketch1')} | {num(s0['exact'])} | {errs} |"
        )
    lines.append("")
    K = next(iter(T.values()))["seed_sweep"]["seeds"]
    if K > 2:
        lines.append(
            f"Seed sweep (K = {K}): Jaccard mean +- sd [min, max] of Rademacher seeds 1..{K - 1} and sketch seeds "
            f"0..{K - 1} vs rademacher0, and of seeds 0..{K - 1} of both vs exact"
        )
        lines.append("")
        lines.append(
            "| target | rademacher vs rademacher0 | sketch vs rademacher0 | rademacher vs exact | sketch vs exact "
            "| Spearman vs exact: rademacher / sketch | sketch - rademacher +- SE (vs rad0 / vs exact) |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for t, v in T.items():
            w = v["seed_sweep"]
            c = lambda key: f"{w[key]['mean']:.3f} +- {w[key]['std']:.3f} [{w[key]['min']:.3f}, {w[key]['max']:.3f}]"  # noqa: E731
            d = lambda x: (
                f"{x['sketch_minus_rademacher']:+.3f}"  # noqa: E731
                + ("" if x["standard_error"] is None else f" +- {x['standard_error']:.3f}")
            )
            lines.append(
                f"| {t} | {c('rademacher_vs_rademacher0')} | {c('sketch_vs_rademacher0')} | "
                f"{c('rademacher_vs_exact')} | {c('sketch_vs_exact')} | "
                f"{w['rademacher_spearman_vs_exact']['mean']:.4f} / {w['sketch_spearman_vs_exact']['mean']:.4f} | "
                f"{d(w['difference_vs_rademacher0'])} / {d(w['difference_vs_exact'])} |"
            )
        lines.append("")
    checks = [f"{t} {n}: {c['jaccard']:.3f}" for t, v in T.items() for n, c in v["self_check"].items()]
    lines.append("Self-checks (must be 1.000): " + "; ".join(checks))
    m = {k: v for k, v in report["methods"].items() if k in MAIN_METHODS}
    lines.append(
        "Projection of the pool, matrix build included (s): "
        + ", ".join(f"{k} {v['build_seconds'] + v['project_pool_seconds']:.2f}" for k, v in m.items())
    )
    s = report["summary"]
    lines.append(
        f"Verdict: sketch overlaps rademacher0 at least as much as rademacher1 does (Jaccard, both sketch "
        f"seeds) on {s['targets_holding']} of {s['targets_informative']} informative targets"
        + (
            f" ({s['targets'] - s['targets_informative']} uninformative)"
            if s['targets'] > s['targets_informative']
            else ""
        )
    )
    if K > 2:
        lines.append(
            f"Seed-averaged (K = {K}): sketch mean >= Rademacher mean on {s['targets_holding_sweep_vs_rademacher0']} "
            f"targets against rademacher0, on {s['targets_holding_sweep_vs_exact']} against the exact selection; "
            f"the difference is within 2 standard errors on {s['targets_within_2se_vs_rademacher0']} and "
            f"{s['targets_within_2se_vs_exact']} of {s['targets_informative']}"
        )
    return "\n".join(lines)


def versions() -> dict:
    import scipy
    import torch
    import transformers

    import lessctl

    out = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "scipy": scipy.__version__,
        "lessctl": lessctl.__version__,
    }
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "lessctl-projection-quality",
        help="workspace folder, built or reused (default: %(default)s); never inside the repository",
    )
    ap.add_argument("--cot-lines", type=int, default=3000, help="first lines of cot in the pool (default 3000)")
    ap.add_argument("--dim", type=int, default=1024, help="projection dimension (default 1024)")
    ap.add_argument("--lora-r", type=int, default=64, help="LoRA rank (alpha 4r; default 64: P = 65,536)")
    ap.add_argument("--epochs", type=int, default=1, help="warmup epochs (default 1)")
    ap.add_argument(
        "--max-seq-length",
        type=int,
        default=4096,
        help="token limit of an example (default 4096: with the tiny tokenizer, shorter limits cut the "
        "completions of many target examples, whose features are then zero)",
    )
    ap.add_argument(
        "--seeds",
        type=int,
        default=8,
        help="seeds per projection in the sweep (default 8; 2: only the seeds 0 and 1 comparison)",
    )
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument(
        "--json", type=Path, default=None, help="write every figure here (default: OUT/projection_quality.json)"
    )
    args = ap.parse_args(argv)
    t_start = time.time()

    from lessctl.models import default_device, quiet_hf

    quiet_hf()
    device = args.device or default_device()
    data_dir = shared_data_dir()
    if not (data_dir / "eval").is_dir() or not (data_dir / "train" / "processed").is_dir():
        sys.exit(f"no real data folder at {data_dir} (set LESSCTL_TEST_DATA)")
    out = args.out.resolve()
    try:
        out.relative_to(REPO)
        sys.exit(f"--out {out}: is inside the repository; the pool's data may not be copied there")
    except ValueError:
        pass

    cfg, changed = build_workspace(out, data_dir, args)
    warm = warmup(cfg, changed, device)
    feats = unprojected_features(cfg, device)
    print(
        f"P = {feats['P']:,} (LoRA gradient dimension), N = {len(feats['pool_names']):,} pool examples "
        f"({', '.join(f'{k} {v}' for k, v in feats['pool_sizes'].items())}) + "
        f"{sum(len(v['subtasks']) for v in feats['targets'].values())} target examples",
        flush=True,
    )
    log("projecting and scoring")
    t0 = time.time()
    if args.seeds < 2:
        sys.exit("--seeds: at least 2")
    ev = evaluate(feats, args.dim, device, args.seeds)
    holding = sum(1 for v in ev["targets"].values() if v["sketch_at_least_yardstick"]["holds"])
    informative = sum(1 for v in ev["targets"].values() if v["sketch_at_least_yardstick"]["informative"])
    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": versions(),
        "device": device,
        "settings": {
            "out": str(out),
            "data_dir": str(data_dir),
            "cot_lines": args.cot_lines,
            "dim": args.dim,
            "lora_r": args.lora_r,
            "lora_alpha": 4 * args.lora_r,
            "epochs": args.epochs,
            "seeds": args.seeds,
            "max_seq_length": args.max_seq_length,
            "warmup_percentage": cfg.warmup.percentage,
            "percentage": PERCENTAGE,
            "checkpoint_step": feats["step"],
            "checkpoint": feats["checkpoint"],
            "pool": {k: str(v) for k, v in cfg.train_files().items()},
            "targets": list(TARGETS),
            "normalization": "L2 rows rounded to float16 (as the gradient store keeps them)",
            "pool_grad_type": "adam",
            "target_grad_type": "sgd",
        },
        "sizes": {
            "P": feats["P"],
            "N_pool": len(feats["pool_names"]),
            "pool": feats["pool_sizes"],
            "targets": {t: len(v["subtasks"]) for t, v in feats["targets"].items()},
            "feature_bytes": feats["feature_bytes"],
            "zero_label_rows": feats["zero_label_rows"],
            "effective_coordinates": feats["effective_coordinates"],
        },
        "warmup": warm,
        "seconds": {"features": feats["seconds"], "evaluate": round(time.time() - t0, 2)},
        **ev,
        "summary": {
            "targets": len(ev["targets"]),
            "targets_informative": informative,
            "targets_holding": holding,
            "holds_all": informative == len(ev["targets"]) and holding == informative,
            "targets_holding_sweep_vs_rademacher0": sum(
                1 for v in ev["targets"].values() if v["seed_sweep"]["holds_vs_rademacher0"]
            ),
            "targets_holding_sweep_vs_exact": sum(
                1 for v in ev["targets"].values() if v["seed_sweep"]["holds_vs_exact"]
            ),
            **{
                f"targets_within_2se_vs_{ref}": sum(
                    1
                    for v in ev["targets"].values()
                    if v["sketch_at_least_yardstick"]["informative"]
                    and v["seed_sweep"][f"difference_vs_{ref}"]["within_2_se"]
                )
                for ref in ("rademacher0", "exact")
            },
            "self_checks_pass": all(
                c["jaccard"] == 1.0 for v in ev["targets"].values() for c in v["self_check"].values()
            ),
        },
    }
    report["seconds"]["total"] = round(time.time() - t_start, 2)
    print(table(report), flush=True)
    print(
        f"Run time: {report['seconds']['total']:.1f} s (warmup {warm['seconds']:.1f} s, features "
        f"{feats['seconds']:.1f} s, projections and scores {report['seconds']['evaluate']:.1f} s)",
        flush=True,
    )
    path = args.json or (out / "projection_quality.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    log(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
