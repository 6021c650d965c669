"""`lessctl ir prepare|eval`: BEIR collections as listwise reranking data, and reranking scores."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from lessctl.commands._common import STATE, BarCallback, JsonOpt, ProgressBar, emit_json, err_console, print_table

app = typer.Typer(
    help="Information retrieval: BEIR data as listwise reranking examples, and NDCG@5/MRR@5 of rerankers.",
    no_args_is_help=True,
)


def prepare(
    beir: Annotated[
        Path, typer.Option("--beir", help="A BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.")
    ],
    name: Annotated[
        str, typer.Option("--name", help="Name of the collection; files are NAME_dev/_eval.jsonl or NAME_data.jsonl.")
    ],
    role: Annotated[
        str, typer.Option("--role", help="target (a dev file for LESS and an eval file) or pool (training data).")
    ] = "target",
    split: Annotated[
        str, typer.Option("--split", help="qrels split of the eval queries (target) or the examples (pool).")
    ] = "test",
    dev_split: Annotated[
        Optional[str],
        typer.Option(
            "--dev-split",
            help="qrels split of the dev queries (default: train when the collection has it, else --split; never "
            "overlapping the eval queries).",
        ),
    ] = None,
    dev_queries: Annotated[
        Optional[int], typer.Option("--dev-queries", help="Dev queries: the LESS target (target role; default 10).")
    ] = None,
    eval_queries: Annotated[
        int, typer.Option("--eval-queries", help="A seeded sample of this many eval queries (0: all).")
    ] = 0,
    candidates: Annotated[int, typer.Option("--candidates", help="Passages per example, labelled [A], [B], ...")] = 5,
    max_relevant: Annotated[
        int,
        typer.Option(
            "--max-relevant",
            help="Pool: relevant passages per example (0: candidates - 1, leaving room for a hard negative).",
        ),
    ] = 0,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the passage order, the dev queries and pool sampling.")
    ] = 0,
    max_passage_tokens: Annotated[
        int, typer.Option("--max-passage-tokens", help="Passages are cut to this many tokens.")
    ] = 100,
    tokenizer: Annotated[
        Optional[str],
        typer.Option(
            "--tokenizer", help="Tokenizer (folder or hub name) counting passage tokens (default: whitespace tokens)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder (default: the current folder).")] = Path("."),
    force: Annotated[
        bool, typer.Option("--force", metavar="", help="Replace files prepared with other settings.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write listwise reranking examples (BM25 first-stage candidates) from a BEIR folder."""
    from lessctl.errors import ConfigError
    from lessctl.ir.prepare import prepare_ir

    if dev_queries is not None and role == "pool":
        raise ConfigError("--dev-queries applies to --role target only (a pool has no dev file)")
    with ProgressBar(f"{name}", unit="items", quiet=json_out) as bar:
        summary = prepare_ir(
            beir,
            name,
            out,
            role=role,
            split=split,
            dev_split=dev_split,
            dev_queries=10 if dev_queries is None else dev_queries,
            eval_queries=eval_queries,
            candidates=candidates,
            max_relevant=max_relevant,
            seed=seed,
            max_passage_tokens=max_passage_tokens,
            tokenizer=tokenizer,
            force=force,
            progress=lambda what, done, total: bar.update(description=f"{name}: {what}", completed=done, total=total),
        )
    if json_out:
        emit_json(summary.to_dict())
        return
    con = err_console()
    for note in summary.notes:
        con.print(f"note: {note}")
    rows = [[k, str(v)] for k, v in summary.counts.items()]
    rows += [[f"file ({k})", p] for k, p in summary.files.items()]
    print_table(f"{name} ({summary.role}, {summary.seconds:.1f} s)", ["", "value"], rows)


def eval_(
    dataset: Annotated[Path, typer.Option("--dataset", help="A prepared NAME_eval.jsonl (from `lessctl ir prepare`).")],
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            help="A model folder, a LoRA adapter folder (merged into its base) or 'base' (default: every finetuned "
            "model of the workspace).",
        ),
    ] = None,
    bm25: Annotated[
        bool,
        typer.Option(
            "--bm25", metavar="", help="Score the BM25 first-stage order itself (no model): the baseline to beat."
        ),
    ] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N queries (0: all).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Prompts per generation batch.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer generated (greedy).")] = 64,
    device: Annotated[
        Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda if available).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Rerank the eval queries' candidates with a model (or BM25): NDCG@5, MRR@5 and malformed answers."""
    from lessctl.config import load_config
    from lessctl.errors import ConfigError
    from lessctl.evaluation.ranking import read_eval_file, run_ir_evaluation
    from lessctl.evaluation.runner import models_to_evaluate
    from lessctl.outputs import artifacts, provenance

    if bm25 and model is not None:
        raise ConfigError("--bm25 scores the first stage without a model; leave out --model")
    if limit is not None and limit < 0:
        raise ConfigError(f"--limit: must be 0 (all) or more, got {limit}")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be at least 1, got {max_new_tokens}")
    # A workspace is optional: without one, results go to ./out like the defaults say.
    cfg = load_config(STATE.config_path, {"eval.batch_size": batch_size}, required=False)
    dataset = dataset.expanduser().resolve()  # relative to the current folder, not the workspace
    read_eval_file(dataset)
    options = {"limit": limit or None}
    if bm25:
        specs = [None]
    else:
        specs = models_to_evaluate(model, cfg.output_dir, cfg.model_ref())
        options.update(batch_size=cfg.eval.batch_size, max_new_tokens=max_new_tokens, chat_format=cfg.model.chat_format)
    records = []
    con = err_console()
    for spec in specs:
        label = spec.name if spec else "bm25"
        made_from = provenance.eval_fingerprint(
            dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, limit=limit or 0)),
            "",
            eval_file=dataset,
            model=artifacts.model_id(cfg, label, spec.path if spec else None),
        )
        with ProgressBar(f"ir {label}", unit="queries", quiet=json_out) as bar:
            progress = None if spec is None else BarCallback(bar)
            outcome = run_ir_evaluation(
                spec,
                dataset,
                cfg.output_dir,
                dtype=cfg.model.dtype,
                device=device,
                **options,
                **({"progress": progress} if progress else {}),
            )
        artifacts.stamp(outcome.path, made_from)
        records.append(outcome.record)
        if not json_out:
            m = outcome.record["metrics"]
            con.print(
                f"{outcome.record['model']} {outcome.record['task']}: ndcg@5 {m['ndcg@5']:.2f}, "
                f"mrr@5 {m['mrr@5']:.2f}, malformed {m['malformed']} -> {outcome.path}"
            )
    if json_out:
        emit_json({"results": records})
        return
    print_table(
        "reranking (percent)",
        ["model", "method", "target", "task", "ndcg@5", "mrr@5", "malformed", "n"],
        [
            [
                r["model"],
                r.get("method"),
                r.get("target"),
                r["task"],
                f"{r['metrics']['ndcg@5']:.2f}",
                f"{r['metrics']['mrr@5']:.2f}",
                f"{r['metrics']['malformed']} ({r['metrics']['malformed_rate']:.1f}%)",
                r["n"],
            ]
            for r in records
        ],
    )


app.command(
    "prepare",
    epilog="Example: lessctl ir prepare --beir ../shared/data/beir/scifact --name scifact --out data --dev-queries 10",
)(prepare)
app.command(
    "eval",
    epilog="Examples: lessctl ir eval --dataset data/scifact_eval.jsonl --bm25  |  "
    "lessctl ir eval --model out/finetune/scifact-less --dataset data/scifact_eval.jsonl --json",
)(eval_)


def register(main_app: typer.Typer) -> None:
    main_app.add_typer(app, name="ir", help="Information retrieval: prepare BEIR reranking data, evaluate rerankers.")
