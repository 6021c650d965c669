"""The tiny offline IR workspace (`lessctl init --preset tiny-ir`): a tiny model and BEIR-shaped pool and targets."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lessctl.errors import ConfigError
from lessctl.ir.bm25 import Progress
from lessctl.ir.prepare import prepare_ir

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- tiny-ir workspace

TINY_IR_PASSAGE_TOKENS = 24  # whitespace tokens: keeps a 5-passage example within the tiny model's context
TINY_IR_MAX_SEQ_LENGTH = 1024


def _collection_name(folder: Path) -> str:
    name = folder.name
    return name[: -len("_sample")] if name.endswith("_sample") else name


def tiny_ir_layout(beir_root: str | os.PathLike) -> tuple[tuple[str, Path], list[tuple[str, Path]]]:
    """The pool ((name, folder) of the `msmarco*` collection) and the targets (every other BEIR folder)
    under a folder of BEIR collections such as `../shared/data/beir`."""
    root = Path(beir_root).expanduser()
    hint = "the tiny-ir preset needs --data-dir pointing to a folder of BEIR collections (e.g. ../shared/data/beir)"
    if not root.is_dir():
        raise ConfigError(f"--data-dir: {root} is not a folder; {hint}")
    found = sorted(p for p in root.iterdir() if p.is_dir() and (p / "corpus.jsonl").is_file())
    pools = [p for p in found if p.name.startswith("msmarco")]
    targets = [p for p in found if p not in pools]
    if not pools or not targets:
        raise ConfigError(
            f"--data-dir: {root} holds {len(found)} BEIR collections; {hint}, with an msmarco* one (the pool) "
            "and at least one other (the targets)"
        )
    return (_collection_name(pools[0]), pools[0]), [(_collection_name(p), p) for p in targets]


def build_tiny_ir_model(out_dir: Path, texts: list[str], seed: int = 0, vocab_size: int = 1000) -> Path:
    """lessctl.tiny's model and tokenizer, with a context long enough for a listwise example."""
    from lessctl.tiny import build_tiny_model

    return build_tiny_model(out_dir, texts, seed=seed, vocab_size=vocab_size, max_positions=TINY_IR_MAX_SEQ_LENGTH)


def build_tiny_ir_workspace(
    folder: Path, beir_root: str | os.PathLike, *, seed: int = 0, progress: Progress | None = None
) -> dict[str, Path]:
    """Prepares the pool and every target of `tiny_ir_layout` into `folder/data` and builds the tiny
    model in `folder/model`. Returns {file key: path}."""
    from lessctl.tiny import corpus_texts

    (pool_name, pool_dir), targets = tiny_ir_layout(beir_root)
    data = Path(folder) / "data"
    files: dict[str, Path] = {}
    common = {"seed": seed, "max_passage_tokens": TINY_IR_PASSAGE_TOKENS, "force": True, "progress": progress}
    s = prepare_ir(pool_dir, pool_name, data, role="pool", **common)
    files[f"{pool_name}_data"] = Path(s.files["data"])
    for name, d in targets:
        s = prepare_ir(d, name, data, role="target", **common)
        files[f"{name}_dev"], files[f"{name}_eval"] = Path(s.files["dev"]), Path(s.files["eval"])
    build_tiny_ir_model(Path(folder) / "model", corpus_texts(list(files.values())), seed=seed)
    return files
