"""Hostile use: every case ends in one `error:` line naming the file, line or option, the documented exit code,
no traceback, and every file that existed before byte for byte as it was (sha256 of the whole workspace).

The table (CASES) covers changed sources, bad weights, overwrites, damaged and incomplete stores, a second
writer, config values the validator must refuse, devices torch cannot use, non-UTF-8 bytes, damaged warmup
files, a file in place of a folder, a read-only folder and a full disk. The tests after it cover what is
not a single failing command: kill -9 at several points, Ctrl-C, and that the advice given works.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def snapshot(ws: Path) -> dict[str, str]:
    """sha256 of every file under the workspace (the model included: it is small)."""
    out = {}
    for p in sorted(ws.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(ws))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def steps(ws: Path) -> list[int]:
    return [c["step"] for c in json.loads((ws / "out" / "warmup" / "checkpoints.json").read_text())]


def store(ws: Path, name: str, kind: str, k: int = 0) -> Path:
    return ws / "out" / "grads" / f"{name}-ckpt{steps(ws)[k]}-{kind}.h5"


def edit_toml(ws: Path, old: str, new: str) -> None:
    p = ws / "lessctl.toml"
    text = p.read_text()
    assert old in text, old
    p.write_text(text.replace(old, new, 1))


def put_bytes(path: Path, line: int, data: bytes) -> None:
    """Replace 1-based line `line` of a file by `data` (a newline is added)."""
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = data
    path.write_bytes(b"\n".join(lines))


def make_old_format(path: Path) -> None:
    """Rewrite a store as stores were written before checksums: contiguous datasets, no filters."""
    tmp = path.with_name("old-" + path.name)
    with h5py.File(path, "r") as src, h5py.File(tmp, "w") as dst:
        for k, v in src.attrs.items():
            if k != "dims":
                dst.attrs[k] = v
        dst.create_dataset("index", data=src["index"][:])
        for g in src:
            if g.startswith("dim"):
                for ds in ("features", "norms"):
                    dst.create_dataset(f"{g}/{ds}", data=src[f"{g}/{ds}"][:])
    os.replace(tmp, path)


def flip_bit(path: Path, dataset: str, row: int, byte_in_row: int, bit: int) -> None:
    """Flip one bit of a stored feature value, in the file's bytes (under HDF5's feet)."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        if ds.chunks is None:
            offset = ds.id.get_offset() + row * ds.shape[1] * 2 + byte_in_row
        else:
            rows = ds.chunks[0]
            info = ds.id.get_chunk_info_by_coord((row // rows * rows, 0))
            offset = info.byte_offset + (row % rows) * ds.shape[1] * 2 + byte_in_row
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([b ^ (1 << bit)]))


def own_stores(ws: Path) -> None:
    """Stores record the absolute path of their base model: make the copied workspace's stores name its own
    model, as stores written in this folder do (resuming or mixing them compares the path)."""
    for p in (ws / "out" / "grads").glob("*.h5*"):
        with h5py.File(p, "r+") as f:
            f.attrs["base_model"] = str((ws / "model").resolve())


def to_part(path: Path, rows_completed: int) -> Path:
    """A complete store turned into the `.part` an interrupted run leaves."""
    part = path.with_name(path.name + ".part")
    os.replace(path, part)
    with h5py.File(part, "r+") as f:
        f.attrs.modify("complete", False)
        f.attrs.modify("rows_completed", np.int64(rows_completed))
    return part


HOLDER = """
import sys, time, h5py
f = h5py.File(sys.argv[1], "r+", locking=True)   # what a live `lessctl grads` does with its .part
print("ready", flush=True)
time.sleep(120)
"""


def hold_open(path: Path) -> Callable[[], None]:
    """Keep `path` open for writing in another process (HDF5's lock), like a live writer; returns the stop."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"

    def stop() -> None:
        child.kill()
        child.wait(timeout=60)

    return stop


def mount_tmpfs(where: Path, size: str) -> Callable[[], None]:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or r.returncode}): no full-disk case")
    return lambda: subprocess.run(["umount", "-l", str(where)], check=False)


# ----------------------------------------------------------------------------- setups (each gets the workspace)


def s_copy_target(ws):  # another target's examples over sorting's file: same number of lines, other content
    (ws / "data" / "sorting_target.jsonl").write_bytes((ws / "data" / "antonyms_target.jsonl").read_bytes())


def s_swap_pool_lines(ws):
    p = ws / "data" / "synth_a.jsonl"
    lines = p.read_text().splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]
    p.write_text("".join(lines))


def s_rewarmed(ws):  # what `warmup --force` leaves: other weights under the same checkpoint steps
    run = ws / "out" / "warmup" / "lessctl_run.json"
    run.write_text(json.dumps({**json.loads(run.read_text()), "run_id": "another-warmup"}))


def s_selection(ws, cli):
    assert cli("--config", ws / "lessctl.toml", "match", "--target", "sorting").code == 0


def s_bad_json_line(ws):
    put_bytes(ws / "data" / "synth_a.jsonl", 3, b'{"messages": [oops')


def s_non_utf8_line(ws):
    p = ws / "data" / "synth_b.jsonl"
    line = p.read_bytes().split(b"\n")[1]
    put_bytes(p, 2, line.replace(b'"content": "', b'"content": "\xff\xfe', 1))


def s_fake_adapter(ws):
    d = ws / "out" / "finetune" / "mine"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"base_model_name_or_path": "model"}')
    (d / "adapter_model.safetensors").write_bytes(b"weights of a finetune")
    (ws / "bad.jsonl").write_text('{"prompt": "x", "completion": "y"}\n{"prompt": 5}\n')


def s_nan_row(ws):
    with h5py.File(store(ws, "synth_a", "adam"), "r+") as f:
        x = f["dim128/features"][5]
        x[3] = np.nan
        f["dim128/features"][5] = x


def s_nan_row_target(ws):
    with h5py.File(store(ws, "sorting", "sgd"), "r+") as f:
        f["dim128/features"][2] = np.full(128, np.inf, dtype=np.float16)


def s_flip_old(ws):  # an exponent bit of row 7 of a store without checksums: the row's norm is no longer 1
    p = store(ws, "synth_b", "adam", 1)
    make_old_format(p)
    flip_bit(p, "dim128/features", 7, 1, 6)


def s_flip_checksummed(ws):
    flip_bit(store(ws, "synth_b", "adam", 1), "dim128/features", 7, 1, 6)


def s_truncate(ws):
    p = store(ws, "synth_a", "adam")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def s_delete_dataset(ws):
    with h5py.File(store(ws, "synth_a", "adam"), "r+") as f:
        del f["dim128/features"]


def s_delete_group(ws):
    with h5py.File(store(ws, "sorting", "sgd"), "r+") as f:
        del f["dim64"]


def s_part(ws):
    own_stores(ws)
    to_part(store(ws, "sorting", "sgd"), 3)


def s_live_writer(ws):
    return hold_open(to_part(store(ws, "sorting", "sgd"), 3))


def s_garbage_optimizer(ws):
    (ws / "out" / "warmup" / f"checkpoint-{steps(ws)[0]}" / "optimizer.pt").write_bytes(b"\x80\x04garbage" * 10)


def s_garbage_manifest(ws):
    (ws / "out" / "warmup" / "checkpoints.json").write_text('[{"step": 4, "epoch": 1,\n  "lr_mean": }]')


def s_selected_is_a_file(ws):
    (ws / "out" / "selected").write_text("a file where lessctl writes a folder")


def s_grads_is_a_file(ws):
    (ws / "out" / "grads").write_text("a file where lessctl writes a folder")


def s_readonly_selected(ws):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod cannot make a folder read-only (the file-in-place cases cover it)")
    d = ws / "out" / "selected"
    d.mkdir(parents=True)
    d.chmod(0o555)
    return lambda: d.chmod(0o755)


def s_read_only(rel: str):
    """A read-only folder as root sees one too: a read-only bind mount of the folder onto itself."""

    def setup(ws):
        d = ws / rel
        d.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "--bind", str(d), str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot bind-mount here ({r.stderr.decode().strip()}): no read-only-mount case")
        subprocess.run(["mount", "-o", "remount,ro,bind", str(d)], check=True)
        return lambda: subprocess.run(["umount", "-l", str(d)], check=False)

    return setup


def s_full_selected(ws):
    return mount_tmpfs(ws / "out" / "selected", "4k")


def s_full_grads(ws):
    (ws / "out" / "grads").mkdir(parents=True, exist_ok=True)
    return mount_tmpfs(ws / "out" / "grads", "64k")


def s_toml(old: str, new: str):
    def setup(ws):
        edit_toml(ws, old, new)

    return setup


def s_toml_bytes(ws):
    p = ws / "lessctl.toml"
    p.write_bytes(p.read_bytes().replace(b'name = "tiny"', b'name = "ti\xe9ny"', 1))


def s_beir(ws):
    b = ws / "beir"
    (b / "qrels").mkdir(parents=True)
    (b / "corpus.jsonl").write_bytes(b'{"_id": "d1", "title": "", "text": "fine"}\n{"_id": "d2", "text": "caf\xe9"}\n')
    (b / "queries.jsonl").write_text('{"_id": "q1", "text": "what"}\n')
    (b / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")


def s_a_file(name: str):
    def setup(ws):
        (ws / name).write_text("not a folder")

    return setup


def s_pool_as(fmt: str, damage: Callable[[Path], None] | None = None, bad_row: int | None = None):
    """synth_a as the workspace's pool in another format (`gz`, `parquet`), then damaged, or row `bad_row` made
    malformed (a message without content)."""

    def setup(ws):
        import gzip

        import pyarrow as pa
        import pyarrow.parquet as pq

        src = ws / "data" / "synth_a.jsonl"
        rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
        if bad_row is not None:
            rows[bad_row - 1] = {**rows[bad_row - 1], "messages": [{"role": "user"}]}
        if fmt == "gz":
            dst = ws / "data" / "synth_a.jsonl.gz"
            dst.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
        else:
            dst = ws / "data" / "synth_a.parquet"
            pq.write_table(pa.Table.from_pylist(rows), dst, row_group_size=50)
        if damage is not None:
            damage(dst)
        edit_toml(ws, 'synth_a = "data/synth_a.jsonl"', f'synth_a = "data/{dst.name}"')

    return setup


def cut_in_half(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def s_bad_parquet_file(ws):
    (ws / "bad.parquet").write_bytes(b"PAR1 a text file named .parquet\n")


def s_target_parquet_bad_row(ws):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = ws / "data" / "sorting_target.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    rows[2] = {**rows[2], "messages": rows[2]["messages"][:1]}  # no answer
    pq.write_table(pa.Table.from_pylist(rows), ws / "data" / "sorting_target.parquet")
    edit_toml(ws, "data/sorting_target.jsonl", "data/sorting_target.parquet")


# ----------------------------------------------------------------------------- setups of round two (issue 28)


class Payload:
    """A pickle that runs a shell command when it is unpickled (what a hostile checkpoint holds)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def save_payload(path: Path, command: str) -> None:
    import torch

    torch.save({"state": Payload(command), "param_groups": [{"params": [0]}]}, path)


def s_payload_optimizer(ws):  # run, the payload would append to the workspace file (the snapshot sees it)
    ckpt = ws / "out" / "warmup" / f"checkpoint-{steps(ws)[0]}"
    save_payload(ckpt / "optimizer.pt", f"echo pwned >> {ws / 'lessctl.toml'}")


def s_interrupted_warmup(damage: Callable[[Path], None]):
    """A warmup killed after its last checkpoint (no checkpoints.json yet: the next `warmup` resumes), whose last
    checkpoint is then damaged by `damage(checkpoint folder)`."""

    def setup(ws):
        (ws / "out" / "warmup" / "checkpoints.json").unlink()
        last = max((ws / "out" / "warmup").glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
        damage(last)

    return setup


def s_results(*lines: bytes):
    """results.jsonl with these lines (each given with its own newline, or none)."""

    def setup(ws):
        (ws / "out" / "results.jsonl").write_bytes(b"".join(lines))

    return setup


GOOD_RESULT = b'{"model": "base", "task": "sorting", "metric": "accuracy", "score": 12.5, "n": 4}\n'


def s_huge_claim(ws):
    """synth_a's store at the first checkpoint replaced by a tiny file whose datasets claim 10^9 rows (unwritten
    chunks read back as zeros: reading them all takes hours)."""
    p = store(ws, S, "adam")
    with h5py.File(p, "r") as f:
        attrs = dict(f.attrs)
        dims = [int(g[3:]) for g in f if g.startswith("dim")]
    p.unlink()
    n = 10**9
    with h5py.File(p, "w") as f:
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs.modify("n_rows", np.int64(n))
        f.attrs.modify("rows_completed", np.int64(n))
        if "total_rows" in attrs:
            f.attrs.modify("total_rows", np.int64(n))
        f.create_dataset("index", shape=(n,), dtype=np.int64, chunks=(1 << 16,))
        for d in dims:
            f.create_dataset(f"dim{d}/features", shape=(n, d), dtype=np.float16, chunks=(1 << 12, d))
            f.create_dataset(f"dim{d}/norms", shape=(n,), dtype=np.float32, chunks=(1 << 16,))
    assert p.stat().st_size < 100_000


STUDY = "\n[study]\nmethods = [\"less\", \"random\"]\n"


def s_study(extra: str):
    def setup(ws):
        p = ws / "lessctl.toml"
        p.write_text(p.read_text() + STUDY + extra)

    return setup


def s_selection_then(damage: Callable[[Path], None]):
    """A selection of the sorting target, then `damage(selected/sorting/less)`."""

    def setup(ws, cli):
        s_selection(ws, cli)
        damage(ws / "out" / "selected" / T / "less")

    return setup


def s_fifo_data(ws):
    os.mkfifo(ws / "data" / "pipe.jsonl")
    edit_toml(ws, 'synth_a = "data/synth_a.jsonl"', 'synth_a = "data/pipe.jsonl"')


def s_eval_json(model: str, task: str, text: str):
    def setup(ws):
        d = ws / "out" / "eval" / model
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{task}.json").write_text(text)

    return setup


def s_both(*setups):
    def setup(ws):
        for one in setups:
            one(ws)

    return setup


def s_lr_zero(ws):  # what a one-step warmup spent warming up records: every checkpoint's mean learning rate 0
    p = ws / "out" / "warmup" / "checkpoints.json"
    p.write_text(json.dumps([{**c, "lr_mean": 0.0} for c in json.loads(p.read_text())]))


def s_trained_then(damage: Callable[[Path], None]):
    """A selection of the sorting target and an adapter trained on it (as `run` would leave them), then
    `damage(selected/sorting/less)`."""

    def setup(ws, cli):
        s_selection(ws, cli)
        d = ws / "out" / "finetune" / f"{T}-less"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text('{"base_model_name_or_path": "model"}')
        (d / "adapter_model.safetensors").write_bytes(b"weights of a finetune")
        damage(ws / "out" / "selected" / T / "less")

    return setup


def s_other_data_sets_store(ws):  # synth_b's store copied over synth_a's: not a change of synth_a.jsonl
    for k in (0, 1):
        src, dst = store(ws, "synth_b", "adam", k), store(ws, S, "adam", k)
        dst.write_bytes(src.read_bytes())


G, W = "tiny_grads_ws", "tiny_ws"  # the workspace each case starts from: with gradient stores, or warmed up only
T, S = "sorting", "synth_a"
WARMUP = ["warmup", "--force", "--device", "cpu"]

# (id, workspace, setup, command (after --config), exit code, what the error line must name)
CASES = [
    # 1. data lost or silently wrong
    ("target-file-changed", G, s_copy_target, ["match", "--target", T], 2, "sorting_target.jsonl changed"),
    ("pool-file-changed", G, s_swap_pool_lines, ["match", "--target", T], 2, "synth_a.jsonl changed"),
    ("warmup-retrained", G, s_rewarmed, ["match", "--target", T], 2, "the warmup was trained again"),
    ("weights-nan", G, None, ["match", "--target", T, "--weights", "nan", "1"], 2, "--weights"),
    ("weights-inf", G, None, ["match", "--target", T, "--weights", "1", "inf"], 2, "--weights"),
    ("weights-negative", G, None, ["match", "--target", T, "--weights", "-1", "1"], 2, "--weights"),
    ("weights-count", G, None, ["match", "--target", T, "--weights", "-1", "1", "1", "1"], 2, "--weights: 4 weights"),
    ("match-exists", G, s_selection, ["match", "--target", T], 2, "--force"),
    (
        "match-empty-force",
        G,
        s_selection,
        ["match", "--target", T, "--percentage", "0.001", "--force"],
        2,
        "--percentage",
    ),
    ("warmup-force-bad-line", W, s_bad_json_line, ["warmup", "--force", "--device", "cpu"], 2, "synth_a.jsonl:3"),
    ("warmup-force-not-utf8", W, s_non_utf8_line, ["warmup", "--force", "--device", "cpu"], 2, "synth_b.jsonl:2"),
    ("warmup-force-cuda", W, None, ["warmup", "--force", "--device", "cuda"], 2, "--device"),
    (
        "finetune-force-bad-line",
        W,
        s_fake_adapter,
        ["finetune", "--train-file", "bad.jsonl", "--name", "mine", "--force", "--device", "cpu"],
        2,
        "bad.jsonl:2",
    ),
    (
        "finetune-force-no-file",
        W,
        s_fake_adapter,
        ["finetune", "--train-file", "nope.jsonl", "--name", "mine", "--force"],
        2,
        "nope.jsonl",
    ),
    ("finetune-exists", W, s_fake_adapter, ["finetune", "--train-file", "bad.jsonl", "--name", "mine"], 2, "--force"),
    ("finetune-name-slash", W, None, ["finetune", "--train-file", "data/synth_a.jsonl", "--name", "a/b"], 2, "--name"),
    ("nan-row-pool", G, s_nan_row, ["match", "--target", T], 2, "synth_a-ckpt"),
    ("inf-row-target", G, s_nan_row_target, ["match", "--target", T], 2, "rows 2-2"),
    ("flipped-bit-old-store", G, s_flip_old, ["match", "--target", T], 2, "rows 7-7"),
    ("flipped-bit-checksum", G, s_flip_checksummed, ["match", "--target", T], 2, "damaged"),
    ("flipped-bit-verify", G, s_flip_checksummed, ["store", "verify"], 1, "synth_b-ckpt"),
    ("truncated-match", G, s_truncate, ["match", "--target", T], 2, "synth_a-ckpt"),
    ("truncated-verify", G, s_truncate, ["store", "verify"], 1, "synth_a-ckpt"),
    ("deleted-dataset-match", G, s_delete_dataset, ["match", "--target", T], 2, "dim128/features"),
    ("deleted-dataset-verify", G, s_delete_dataset, ["store", "verify"], 1, "dim128/features"),
    ("deleted-group-match", G, s_delete_group, ["match", "--target", T, "--dim", "64"], 2, "dims"),
    ("incomplete-store-advice", G, s_part, ["match", "--target", T], 2, "--target sorting --dims 64 128"),
    ("verify-sees-part", G, s_part, ["store", "verify"], 1, ".part"),
    (
        "resume-other-batch-tokens",
        G,
        s_part,
        ["grads", "--target", T, "--ckpt", "{step0}", "--batch-tokens", "999", "--device", "cpu"],
        2,
        "batch_tokens",
    ),
    (
        "grads-force-live-writer",
        G,
        s_live_writer,
        ["grads", "--target", T, "--ckpt", "{step0}", "--force", "--device", "cpu"],
        2,
        "open in another process",
    ),
    (
        "grads-second-writer",
        G,
        s_live_writer,
        ["grads", "--target", T, "--ckpt", "{step0}", "--device", "cpu"],
        2,
        "open in another process",
    ),
    ("match-live-writer", G, s_live_writer, ["match", "--target", T], 2, "open in another process"),
    # 2. values the validator must refuse, each blamed on where it came from
    ("lora-r-zero", W, s_toml("r = 8", "r = 0"), ["warmup", "--force"], 2, "lessctl.toml: lora.r"),
    ("lora-r-negative", W, s_toml("r = 8", "r = -8"), ["config", "show"], 2, "lessctl.toml: lora.r"),
    ("lora-dropout", W, s_toml("dropout = 0.1", "dropout = 7.5"), ["warmup"], 2, "lora.dropout"),
    ("block-size-zero", W, s_toml("[grads]\n", "[grads]\nblock_size = 0\n"), ["grads"], 2, "grads.block_size"),
    ("batch-tokens-zero", G, None, ["grads", "--batch-tokens", "0"], 2, "--batch-tokens"),
    ("batch-tokens-negative", G, None, ["grads", "--batch-tokens", "-5"], 2, "--batch-tokens"),
    ("dims-negative-option", G, None, ["grads", "--dims", "-5"], 2, "--dims"),
    ("epochs-zero-option", W, None, ["warmup", "--epochs", "0", "--force"], 2, "--epochs"),
    (
        "train-name-slash",
        W,
        s_toml("train = {synth_a", 'train = {"a/b" = "data/synth_a.jsonl", synth_a'),
        ["grads"],
        2,
        "data.train.a/b",
    ),
    ("percentage-zero", G, None, ["match", "--target", T, "--percentage", "0"], 2, "--percentage"),
    ("dim-missing-advice", G, None, ["match", "--target", T, "--dim", "32"], 2, "--dims 32 64 128 --force"),
    ("device-gpu", G, None, ["grads", "--device", "gpu"], 2, "--device: unknown device 'gpu'"),
    ("device-cuda-cpu-torch", G, None, ["grads", "--device", "cuda"], 2, "--device: cuda is not available"),
    ("device-run", G, None, ["run", "--device", "gpu"], 2, "--device"),
    ("device-eval", G, None, ["eval", "--task", "mmlu", "--model", "base", "--device", "tpu"], 2, "--device"),
    ("config-is-folder", W, None, ["--config-dir", "match"], 2, "--config"),
    ("toml-not-utf8", W, s_toml_bytes, ["match", "--target", T], 2, "lessctl.toml:6"),
    ("data-not-utf8", G, s_non_utf8_line, ["match", "--target", T, "--method", "bm25"], 2, "synth_b.jsonl:2"),
    (
        "target-not-utf8",
        W,
        lambda ws: put_bytes(ws / "data" / "sorting_target.jsonl", 4, b'{"prompt": "\xc3"}'),
        ["grads", "--target", T, "--device", "cpu"],
        2,
        "sorting_target.jsonl:4",
    ),
    (
        "beir-not-utf8",
        W,
        s_beir,
        ["ir", "prepare", "--beir", "beir", "--name", "x", "--out", "irout"],
        2,
        "corpus.jsonl:2",
    ),
    ("demo-dir-file", W, s_a_file("demo.txt"), ["demo", "--dir", "demo.txt"], 2, "--dir"),
    ("demo-epochs-zero", W, None, ["demo", "--dir", "d", "--epochs", "0"], 2, "--epochs"),
    (
        "garbage-optimizer",
        W,
        s_garbage_optimizer,
        ["grads", "--train", S, "--ckpt", "{step0}", "--device", "cpu"],
        2,
        "optimizer.pt",
    ),
    ("garbage-manifest", W, s_garbage_manifest, ["grads"], 2, "checkpoints.json:2"),
    ("results-unknown-task", W, None, ["results", "--task", "nosuch"], 2, "--task"),
    # round two (issue 28): code in a checkpoint, damaged files lessctl reads back, names, seeds, messages
    (
        "optimizer-pickle-payload",
        W,
        s_payload_optimizer,
        ["grads", "--train", S, "--ckpt", "{step0}", "--force", "--device", "cpu"],
        2,
        "optimizer.pt: refused by the safe load",
    ),
    (
        "warmup-resume-garbage-optimizer",
        W,
        s_interrupted_warmup(lambda d: (d / "optimizer.pt").write_bytes(b"\x80\x04garbage" * 10)),
        ["warmup", "--device", "cpu"],
        2,
        "optimizer.pt",
    ),
    (
        "warmup-resume-cut-optimizer",
        W,
        s_interrupted_warmup(lambda d: cut_in_half(d / "optimizer.pt")),
        ["warmup", "--device", "cpu"],
        2,
        "optimizer.pt: cannot be read",
    ),
    (
        "warmup-resume-payload-scheduler",
        W,
        s_interrupted_warmup(lambda d: save_payload(d / "scheduler.pt", f"echo pwned >> {d / 'trainer_state.json'}")),
        ["warmup", "--device", "cpu"],
        2,
        "scheduler.pt: refused by the safe load",
    ),
    (
        "warmup-resume-bad-lrs",
        W,
        s_interrupted_warmup(lambda d: (d / "lessctl_lrs.json").write_text('{"lrs": [0.1, ')),
        ["warmup", "--device", "cpu"],
        2,
        "lessctl_lrs.json",
    ),
    (
        "warmup-resume-cut-adapter",
        W,
        s_interrupted_warmup(lambda d: cut_in_half(d / "adapter_model.safetensors")),
        ["warmup", "--device", "cpu"],
        2,
        "adapter_model.safetensors",
    ),
    ("results-bad-middle-line", W, s_results(GOOD_RESULT, b'{"model": oops}\n', GOOD_RESULT), ["results"], 2, ":2"),
    ("results-a-list-line", W, s_results(GOOD_RESULT, b"[1, 2]\n", GOOD_RESULT), ["results"], 2, "results.jsonl:2"),
    ("store-claims-1e9-rows-verify", G, s_huge_claim, ["store", "verify"], 1, "claim 1000000000 rows"),
    ("store-claims-1e9-rows-match", G, s_huge_claim, ["match", "--target", T], 2, "synth_a-ckpt"),
    ("random-seed-negative", W, s_study("random_seeds = [-1]\n"), ["run", "--dry-run"], 2, "study.random_seeds"),
    ("warmup-seed-negative", W, s_study("warmup_seeds = [-5]\n"), ["run", "--dry-run"], 2, "study.warmup_seeds"),
    ("random-seed-huge", W, s_study("random_seeds = [4294967296]\n"), ["run", "--dry-run"], 2, "study.random_seeds"),
    (
        "experiment-seed-negative",
        W,
        s_toml("seed = 3", "seed = -3"),
        ["grads", "--device", "cpu"],
        2,
        "experiment.seed",
    ),
    ("warmup-data-seed-negative", W, s_toml("\nseed = 0", "\nseed = 0\ndata_seed = -2"), WARMUP, 2, "warmup.data_seed"),
    (
        "data-set-name-300",
        W,
        s_toml("synth_a = ", "d" * 300 + " = "),
        ["grads", "--device", "cpu"],
        2,
        "data.train.ddd",
    ),
    ("target-name-300", W, s_toml("sorting = {", "s" * 300 + " = {"), ["run", "--dry-run"], 2, "data.targets.sss"),
    ("target-name-dot", W, s_toml("sorting = {", '".hidden" = {'), ["run", "--dry-run"], 2, "data.targets..hidden"),
    (
        "finetune-name-300",
        W,
        None,
        ["finetune", "--train-file", "data/synth_a.jsonl", "--name", "x" * 300, "--device", "cpu"],
        2,
        "--name",
    ),
    (
        "report-summary-garbage",
        G,
        s_selection_then(lambda d: (d / "summary.json").write_text('{"file": ')),
        ["report"],
        2,
        "summary.json:1",
    ),
    (
        "report-summary-a-list",
        G,
        s_selection_then(lambda d: (d / "summary.json").write_text("[1, 2]")),
        ["report"],
        2,
        "summary.json: expected",
    ),
    (
        "report-summary-by-is-a-list",
        G,
        s_selection_then(lambda d: (d / "summary.json").write_text('{"file": "x.jsonl", "by_train_set": [1]}')),
        ["report"],
        2,
        "'by_train_set'",
    ),
    (
        "report-sorted-garbage",
        G,
        s_selection_then(lambda d: put_bytes(d / "sorted.csv", 3, b"synth_a, x, 0.5")),
        ["report"],
        2,
        "sorted.csv:3",
    ),
    (
        "report-sorted-short-row",
        G,
        s_selection_then(lambda d: put_bytes(d / "sorted.csv", 2, b"synth_a")),
        ["report"],
        2,
        "sorted.csv:2",
    ),
    (
        "report-checkpoints-garbage",
        G,
        s_selection_then(lambda d: (d.parents[2] / "warmup" / "checkpoints.json").write_text("{")),
        ["report"],
        2,
        "checkpoints.json:1",
    ),
    (
        "report-checkpoints-not-a-list",
        G,
        s_selection_then(lambda d: (d.parents[2] / "warmup" / "checkpoints.json").write_text('{"step": 1}')),
        ["report"],
        2,
        "checkpoints.json: expected",
    ),
    (
        "dry-run-summary-garbage",
        G,
        s_trained_then(lambda d: (d / "summary.json").write_text('{"file": ')),
        ["run", "--dry-run"],
        2,
        "summary.json",
    ),
    (
        "results-study-eval-a-list",
        W,
        s_both(s_study(""), s_eval_json("base", T, "[1, 2]")),
        ["results", "--study"],
        2,
        f"{T}.json: expected",
    ),
    (
        "results-study-eval-garbage",
        W,
        s_both(s_study(""), s_eval_json("base", T, '{"accuracy": ')),
        ["results", "--study"],
        2,
        f"{T}.json:1",
    ),
    ("transfer-root", W, s_study('transfer = ["/"]\n'), ["run", "--dry-run"], 2, "study.transfer"),
    ("transfer-dotdot", W, s_study('transfer = ["model/.."]\n'), ["run", "--dry-run"], 2, "study.transfer"),
    ("bbh-examples-negative", W, None, ["eval", "--task", "bbh", "--bbh-examples", "-1"], 2, "--bbh-examples"),
    ("data-file-fifo", W, s_fifo_data, WARMUP, 2, "pipe.jsonl: is a FIFO"),
    ("data-file-dev-zero", W, s_toml('"data/synth_a.jsonl"', '"/dev/zero"'), WARMUP, 2, "/dev/zero: is a device"),
    (
        "finetune-train-file-dev-zero",
        W,
        None,
        ["finetune", "--train-file", "/dev/zero", "--name", "z", "--device", "cpu"],
        2,
        "/dev/zero: is a device",
    ),
    (
        "finetune-over-a-users-folder",
        W,
        lambda ws: (
            (ws / "out" / "finetune" / "mine").mkdir(parents=True) or (ws / "out/finetune/mine/notes.txt").touch()
        ),
        ["finetune", "--train-file", "data/synth_a.jsonl", "--name", "mine", "--device", "cpu"],
        2,
        "--force",
    ),
    ("match-another-data-sets-store", G, s_other_data_sets_store, ["match", "--target", T], 2, "another data set"),
    (
        "match-lr-zero-warmup",
        G,
        s_lr_zero,
        ["match", "--target", T],
        2,
        "checkpoints.json (lr_mean)",
    ),
    # the machine refuses: a file in a folder's place, a read-only folder, a full disk
    ("selected-is-a-file", G, s_selected_is_a_file, ["match", "--target", T], 2, "selected"),
    ("grads-is-a-file", W, s_grads_is_a_file, ["grads", "--device", "cpu"], 2, "grads"),
    ("read-only-folder", G, s_readonly_selected, ["match", "--target", T], 2, "selected"),
    ("read-only-out-match", G, s_read_only("out"), ["match", "--target", T], 2, "Read-only file system"),
    ("read-only-out-grads", W, s_read_only("out"), ["grads", "--target", T, "--device", "cpu"], 2, "Read-only"),
    (
        "read-only-grads-store",
        G,
        s_read_only("out/grads"),
        ["grads", "--target", T, "--ckpt", "{step0}", "--force", "--device", "cpu"],
        2,
        "Read-only",
    ),
    ("read-only-out-warmup-force", W, s_read_only("out"), ["warmup", "--force", "--device", "cpu"], 2, "Read-only"),
    (
        "read-only-out-finetune",
        W,
        s_read_only("out"),
        ["finetune", "--train-file", "data/synth_a.jsonl", "--name", "x", "--device", "cpu", "--epochs", "1"],
        2,
        "Read-only",
    ),
    # data files in other formats: damaged, not what their name says, a malformed row
    ("pool-gz-cut-short", W, s_pool_as("gz", cut_in_half), WARMUP, 2, "synth_a.jsonl.gz:"),
    ("pool-gz-bad-line", W, s_pool_as("gz", bad_row=3), WARMUP, 2, "synth_a.jsonl.gz:3: messages[0]"),
    ("pool-parquet-cut-short", W, s_pool_as("parquet", cut_in_half), WARMUP, 2, "synth_a.parquet: not a readable"),
    ("pool-parquet-bad-row", W, s_pool_as("parquet", bad_row=17), WARMUP, 2, "synth_a.parquet row 17: messages[0]"),
    (
        "pool-parquet-bad-row-grads",
        W,
        s_pool_as("parquet", bad_row=120),
        ["grads", "--train", S, "--device", "cpu"],
        2,
        "synth_a.parquet row 120",
    ),
    (
        "finetune-not-parquet",
        W,
        s_bad_parquet_file,
        ["finetune", "--train-file", "bad.parquet", "--device", "cpu"],
        2,
        "bad.parquet: not a readable parquet file",
    ),
    (
        "target-parquet-bad-row",
        W,
        s_target_parquet_bad_row,
        ["grads", "--target", T, "--device", "cpu"],
        2,
        "sorting_target.parquet row 3: the last message",
    ),
    ("full-disk-match", G, s_full_selected, ["match", "--target", T], 2, "No space left"),
    ("full-disk-grads", W, s_full_grads, ["grads", "--device", "cpu", "--target", T], 2, "free"),
]


@pytest.mark.parametrize("ws_name, setup, args, code, needle", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_hostile(request, ws_name, setup, args, code, needle, cli):
    ws = request.getfixturevalue(ws_name)
    stop = None
    if setup is not None:
        stop = setup(ws, cli) if setup.__code__.co_argcount == 2 else setup(ws)
    try:
        before = snapshot(ws)
        args = [a.replace("{step0}", str(steps(ws)[0])) if "{step0}" in a else a for a in args]
        if args[0] == "--config-dir":  # --config naming a folder
            res = cli("--config", ws, *args[1:], cwd=ws)
        else:
            res = cli("--config", ws / "lessctl.toml", *args, cwd=ws)
        after = snapshot(ws)
    finally:
        if stop:
            stop()
    errors = [line for line in res.err.splitlines() if line.startswith("error:")]
    assert res.code == code, res
    assert "Traceback" not in res.err + res.out, res
    assert len(errors) == 1, res
    assert needle in errors[0], (needle, errors[0])
    if needle.startswith("--"):
        assert "lessctl.toml: " not in errors[0], errors[0]  # an option's value is blamed on the option
    changed = {k for k in before if before[k] != after.get(k)}
    assert not changed, f"changed or deleted: {sorted(changed)}"
    stray = [k for k in set(after) - set(before) if k.endswith((".tmp", ".part")) or ".new" in k]
    assert not stray, stray


def test_table_is_large_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- beyond one failing command


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_changed_target_is_recomputed_by_grads_then_matched(tiny_grads_ws, cli):
    ws = tiny_grads_ws
    cfg = ("--config", ws / "lessctl.toml")
    own_stores(ws)
    s_copy_target(ws)
    res = cli(*cfg, "grads", "--target", T, "--device", "cpu", "--projector", "basic", "--json")
    assert res.code == 0, res
    assert {r["status"] for r in json.loads(res.out)["stores"]} == {"written"}  # not "skipped"
    assert cli(*cfg, "match", "--target", T).code == 0


def test_stores_of_a_replaced_warmup_are_recomputed(tiny_grads_ws, cli):
    ws = tiny_grads_ws
    own_stores(ws)
    s_rewarmed(ws)
    cfg = ("--config", ws / "lessctl.toml")
    res = cli(*cfg, "grads", "--target", T, "--ckpt", steps(ws)[0], "--device", "cpu", "--projector", "basic", "--json")
    assert res.code == 0 and json.loads(res.out)["stores"][0]["status"] == "written", res
    with h5py.File(store(ws, T, "sgd")) as f:
        assert f.attrs["warmup_run"] == "another-warmup"


def test_incomplete_store_advice_resumes_it(tiny_grads_ws, cli):
    ws = tiny_grads_ws
    own_stores(ws)
    ref = store(ws, T, "sgd")
    with h5py.File(ref) as f:
        want = f["dim128/features"][:]
    to_part(ref, 3)
    err = cli("--config", ws / "lessctl.toml", "match", "--target", T).err
    advice = err.split("`")[1]
    assert advice.startswith("lessctl grads ")
    res = cli("--config", ws / "lessctl.toml", *advice.split()[1:], "--device", "cpu")
    assert res.code == 0, res
    with h5py.File(ref) as f:
        np.testing.assert_array_equal(f["dim128/features"][:], want)
    assert cli("--config", ws / "lessctl.toml", "match", "--target", T).code == 0


def test_dim_advice_works(tiny_grads_ws, cli):
    ws = tiny_grads_ws
    err = cli("--config", ws / "lessctl.toml", "match", "--target", T, "--dim", "32").err
    advice = err.split("`")[1]
    res = cli("--config", ws / "lessctl.toml", *advice.split()[1:], "--device", "cpu", "--projector", "basic")
    assert res.code == 0, res
    assert cli("--config", ws / "lessctl.toml", "match", "--target", T, "--dim", "32").code == 0


def test_deleted_dataset_is_not_complete(tiny_grads_ws, cli):
    s_delete_dataset(tiny_grads_ws)
    stores = json.loads(cli("--config", tiny_grads_ws / "lessctl.toml", "store", "ls", "--json").out)["stores"]
    bad = [s for s in stores if s["name"] == S and s["step"] == steps(tiny_grads_ws)[0]]
    assert bad and bad[0]["complete"] is False


def test_new_stores_carry_checksums_and_old_ones_still_read(tiny_grads_ws, cli):
    p = store(tiny_grads_ws, S, "adam")
    with h5py.File(p) as f:
        assert f["dim128/features"].fletcher32 and f["dim128/norms"].fletcher32
        assert f.attrs["batch_tokens"] > 0 and list(f.attrs["dims"]) == [64, 128]
    for name, kind in ((S, "adam"), ("synth_b", "adam"), (T, "sgd")):
        for k in (0, 1):
            make_old_format(store(tiny_grads_ws, name, kind, k))
    res = cli("--config", tiny_grads_ws / "lessctl.toml", "match", "--target", T)
    assert res.code == 0, res


def test_match_force_replaces_and_run_redoes_the_finetune(tiny_grads_ws, cli):
    ws = tiny_grads_ws
    cfg = ("--config", ws / "lessctl.toml")
    edit_toml(ws, "epochs = 30", "epochs = 1")
    assert cli(*cfg, "run", "--from", "match", "--until", "finetune", "--device", "cpu").code == 0
    adapter = ws / "out" / "finetune" / f"{T}-less" / "adapter_model.safetensors"
    first = adapter.read_bytes()
    assert cli(*cfg, "match", "--target", T, "--percentage", "0.1", "--force").code == 0
    res = cli(*cfg, "run", "--from", "match", "--until", "finetune", "--device", "cpu", "--json")
    assert res.code == 0, res
    stages = {(s["stage"], s["item"]): s for s in json.loads(res.out)["stages"]}
    # the forced selection is not the plan's ([select] percentage is 0.05): run redoes it, then the finetune on it
    match = stages[("match", f"{T}/less")]
    assert match["status"] == "done" and "stale: [select] percentage 0.1 -> 0.05" in match["detail"], match
    redone = stages[("finetune", f"{T}-less")]
    assert redone["status"] == "done" and "stale: selection was made again" in redone["detail"], redone
    assert adapter.read_bytes() == first  # the plan's selection again, trained again: the same adapter
    res = cli(*cfg, "run", "--from", "match", "--until", "finetune", "--device", "cpu", "--json")
    assert all(s["status"] == "skipped" for s in json.loads(res.out)["stages"])


def test_init_force_keeps_edited_data(tmp_path, cli):
    ws = tmp_path / "w"
    assert cli("init", "--preset", "tiny", "--dir", ws).code == 0
    data = ws / "data" / "synth_a.jsonl"
    data.write_text(data.read_text().splitlines()[0] + "\n")
    model = snapshot(ws / "model")
    (ws / "lessctl.toml").write_text("# edited\n")
    assert cli("init", "--preset", "tiny", "--dir", ws, "--force").code == 0
    assert len(data.read_text().splitlines()) == 1 and snapshot(ws / "model") == model
    assert "[model]" in (ws / "lessctl.toml").read_text()
    assert "kept" in cli("init", "--help").out


def _run_lessctl(ws: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lessctl.cli", "--config", str(ws / "lessctl.toml"), *args],
        env={**_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_9_during_forced_warmup_keeps_the_old_warmup(tiny_ws):
    before = snapshot(tiny_ws / "out")
    # the test hook exits hard (os._exit) right after the first checkpoint of the new warmup is saved
    p = _run_lessctl(tiny_ws, "warmup", "--force", "--device", "cpu", env={"LESSCTL_TEST_EXIT_AFTER_SAVES": "1"})
    p.communicate(timeout=600)
    assert p.returncode == 17
    assert {k: v for k, v in snapshot(tiny_ws / "out").items() if not k.startswith("warmup.new")} == before


def test_kill_9_during_forced_grads_keeps_the_old_store(tiny_grads_ws):
    ws = tiny_grads_ws
    before = snapshot(ws / "out" / "grads")
    env = {"LESSCTL_FLUSH_ROWS": "2"}
    p = _run_lessctl(ws, "grads", "--train", S, "--ckpt", str(steps(ws)[0]), "--force", "--device", "cpu", env=env)
    part = store(ws, S, "adam").with_name(store(ws, S, "adam").name + ".part")
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if part.exists():
            try:
                with h5py.File(part, "r", locking=False) as f:
                    if f.attrs["rows_completed"] >= 4:
                        break
            except (OSError, KeyError):
                pass
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    after = snapshot(ws / "out" / "grads")
    assert {k: v for k, v in after.items() if not k.endswith(".part")} == before  # the complete store is intact


def test_kill_9_during_forced_finetune_keeps_the_adapter(tiny_ws):
    s_fake_adapter(tiny_ws)
    before = snapshot(tiny_ws / "out")
    p = _run_lessctl(
        tiny_ws,
        "finetune",
        "--train-file",
        str(tiny_ws / "data" / "synth_a.jsonl"),
        "--name",
        "mine",
        "--force",
        "--device",
        "cpu",
        "--epochs",
        "50",
    )
    time.sleep(8)  # model loaded, training
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert {k: v for k, v in snapshot(tiny_ws / "out").items() if ".new" not in k} == before


def test_ctrl_c_says_what_was_kept(tiny_ws):
    p = _run_lessctl(tiny_ws, "grads", "--device", "cpu", env={"LESSCTL_FLUSH_ROWS": "2"})
    part_seen = time.time() + 300
    grads = tiny_ws / "out" / "grads"
    while time.time() < part_seen and p.poll() is None and not list(grads.glob("*.part")):
        time.sleep(0.05)
    time.sleep(0.5)
    # Python may swallow a KeyboardInterrupt that lands in a weakref or __del__ callback ("Exception ignored"),
    # as a second Ctrl-C would then be needed by a user too: signal until the process reacts
    for _ in range(240):
        p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            continue
    assert p.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("interrupted:") and "resumes" in lines[-1]
    assert "lessctl --config" in lines[-1] and "grads --device cpu" in lines[-1]


def test_two_writers_one_store(tiny_ws):
    """Two `lessctl grads` on one store: while the first writes (stopped mid-way with SIGSTOP, its lock held),
    the second, even with --force, refuses and leaves the first's .part alone; the first then completes."""
    args = ("grads", "--train", S, "--ckpt", str(steps(tiny_ws)[0]), "--device", "cpu")
    a = _run_lessctl(tiny_ws, *args, env={"LESSCTL_FLUSH_ROWS": "1"})
    part = store(tiny_ws, S, "adam").with_name(store(tiny_ws, S, "adam").name + ".part")
    deadline = time.time() + 300
    while time.time() < deadline and a.poll() is None:
        try:
            with h5py.File(part, "r", locking=False) as f:
                if f.attrs["rows_completed"] >= 2:
                    break
        except (OSError, KeyError):
            pass
        time.sleep(0.02)
    a.send_signal(signal.SIGSTOP)
    try:
        with h5py.File(part, "r", locking=False) as f:
            rows = int(f.attrs["rows_completed"])
        for extra in ((), ("--force",)):
            b = _run_lessctl(tiny_ws, *args, *extra)
            _, err_b = b.communicate(timeout=300)
            assert b.returncode == 2 and "open in another process" in err_b, err_b
            assert err_b.count("error:") == 1 and "Traceback" not in err_b
            with h5py.File(part, "r", locking=False) as f:
                assert int(f.attrs["rows_completed"]) == rows  # untouched
    finally:
        a.send_signal(signal.SIGCONT)
    _, err_a = a.communicate(timeout=300)
    assert a.returncode == 0, err_a
    from lessctl.grads.store.reader import verify_store

    assert verify_store(store(tiny_ws, S, "adam")) == []


# ----------------------------------------------------------------------------- round two (issue 28), beyond the table


def test_a_pickle_payload_in_a_checkpoint_never_runs(tiny_ws, tmp_path, cli):
    """A hostile optimizer.pt or scheduler.pt (a pickle whose __reduce__ runs a shell command) is refused by the
    safe load, naming the file, in `grads` and in a warmup resume: the command never runs."""
    cfg = ("--config", tiny_ws / "lessctl.toml")
    marker = tmp_path / "payload-ran"
    first = tiny_ws / "out" / "warmup" / f"checkpoint-{steps(tiny_ws)[0]}" / "optimizer.pt"
    save_payload(first, f"touch {marker}")
    res = cli(*cfg, "grads", "--train", S, "--ckpt", steps(tiny_ws)[0], "--force", "--device", "cpu")
    errors = [line for line in res.err.splitlines() if line.startswith("error:")]
    assert res.code == 2 and len(errors) == 1 and str(first) in errors[0], res
    assert not marker.exists()
    s_interrupted_warmup(lambda d: save_payload(d / "scheduler.pt", f"touch {marker}"))(tiny_ws)
    res = cli(*cfg, "warmup", "--device", "cpu")
    assert res.code == 2 and "scheduler.pt: refused by the safe load" in res.err, res
    assert not marker.exists()


def test_a_real_optimizer_state_still_loads_safely(tiny_ws):
    """weights_only=True reads what the Trainer saves: the moments of every trainable parameter."""
    from lessctl.config import load_config
    from lessctl.grads.adam import load_adam_state
    from lessctl.models import add_lora, load_base_model

    cfg = load_config(tiny_ws / "lessctl.toml")
    model = add_lora(load_base_model(cfg.model_ref(), "fp32", "cpu"), cfg.lora)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    state = load_adam_state(tiny_ws / "out" / "warmup" / f"checkpoint-{steps(tiny_ws)[0]}", params, "cpu")
    assert state.exp_avg.numel() == sum(p.numel() for _, p in params) and float(state.exp_avg_sq.min()) >= 0


def test_the_users_old_folders_survive_swaps(tiny_ws, cli):
    """`<name>.old` folders are the user's: `finetune --force` and `warmup --force` swap their outputs into place
    through an aside of lessctl's own, and leave no aside behind."""
    cfg = ("--config", tiny_ws / "lessctl.toml")
    s_fake_adapter(tiny_ws)
    kept = {}
    for d in (tiny_ws / "out" / "finetune" / "mine.old", tiny_ws / "out" / "warmup.old"):
        d.mkdir(parents=True)
        (d / "keep.txt").write_text(f"the user's {d.name}")
        kept[d] = snapshot(d)
    args = ("--train-file", tiny_ws / "data" / "synth_a.jsonl", "--device", "cpu", "--epochs", "1")
    assert cli(*cfg, "finetune", *args, "--name", "mine", "--force").code == 0
    assert cli(*cfg, "finetune", *args, "--name", "mine.old").code == 2  # it exists (holds no adapter: --force)
    assert cli(*cfg, "warmup", "--force", "--device", "cpu").code == 0
    for d, snap in kept.items():
        assert snapshot(d) == snap, d
    assert (tiny_ws / "out" / "finetune" / "mine" / "adapter_config.json").is_file()
    asides = [p for p in (tiny_ws / "out").rglob("*") if ".lessctl-old-" in p.name]
    assert not asides, asides


def test_a_torn_results_line_is_skipped_and_the_next_eval_starts_a_fresh_line(tiny_ws, data_dir):
    """A killed append leaves half a record without its newline: `results` warns once and shows the rest, and
    the next evaluation's record goes on a line of its own (not glued onto the torn one)."""
    log = tiny_ws / "out" / "results.jsonl"
    log.write_bytes(GOOD_RESULT + GOOD_RESULT[:40])

    def lessctl(*args: str) -> tuple[int, str, str]:
        p = _run_lessctl(tiny_ws, *args)
        out, err = p.communicate(timeout=600)
        return p.returncode, out, err

    code, out, err = lessctl("results", "--json")
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warnings) == 1 and "results.jsonl:2" in warnings[0], err
    assert "error:" not in err and len(json.loads(out)["results"]) == 1
    code, _, err = lessctl(
        "eval", "--task", "mmlu", "--model", "base", "--limit", "1", "--device", "cpu", "--data-dir", str(data_dir)
    )
    assert code == 0, err
    lines = log.read_bytes().split(b"\n")
    assert lines[1] == GOOD_RESULT[:40] and json.loads(lines[2])["task"] == "mmlu" and lines[3] == b""
    code, out, err = lessctl("results", "--json")
    assert code == 0 and err.count("warning:") == 1, err
    assert [r["task"] for r in json.loads(out)["results"]] == ["sorting", "mmlu"]


def test_a_torn_record_anywhere_is_skipped_but_a_wrong_line_is_an_error(tmp_path, caplog):
    from lessctl.errors import InputError
    from lessctl.evaluation.results import append_result, read_results

    log = tmp_path / "results.jsonl"
    log.write_bytes(GOOD_RESULT + b'{"model": "a", "task": "bb')  # torn, then a record appended after it
    append_result(tmp_path, {"model": "b", "task": "mmlu", "score": 1.0})
    assert [r["model"] for r in read_results(tmp_path)] == ["base", "b"]
    assert [r.getMessage() for r in caplog.records if "torn" in r.getMessage()] == [
        f"{log}:2: skipping a torn record (cut short by an interrupted evaluation)"
    ]
    log.write_bytes(GOOD_RESULT + '{"t": "caf\u00e9'.encode()[:-1])  # cut inside a UTF-8 character
    assert len(read_results(tmp_path)) == 1
    log.write_bytes(GOOD_RESULT + b'{"model": "a"} trailing\n' + GOOD_RESULT)
    with pytest.raises(InputError, match=r"results.jsonl:2: invalid JSON"):
        read_results(tmp_path)


def test_verify_reports_progress_and_refuses_a_store_claiming_more_than_it_holds(tiny_grads_ws):
    from lessctl.grads.store.reader import verify_store

    p = store(tiny_grads_ws, S, "adam")
    with h5py.File(p) as f:
        rows, dims = int(f.attrs["n_rows"]), sum(1 for g in f if g.startswith("dim"))
    seen = []
    assert verify_store(p, progress=seen.append) == []
    assert sum(seen) == rows * dims
    s_huge_claim(tiny_grads_ws)
    t0 = time.time()
    (problem,) = verify_store(p)
    assert time.time() - t0 < 10 and "claim 1000000000 rows" in problem and p.name in problem


def test_report_draws_mathtext_labels_as_plain_text(tiny_grads_ws, cli):
    cfg = ("--config", tiny_grads_ws / "lessctl.toml")
    assert cli(*cfg, "match", "--target", T).code == 0
    p = tiny_grads_ws / "out" / "selected" / T / "less" / "summary.json"
    summary = json.loads(p.read_text())
    summary["by_train_set"] = {r"$\undefinedmacro{x}$": 3, "a $ b": 1}
    p.write_text(json.dumps(summary))
    res = cli(*cfg, "report")
    assert res.code == 0 and "Traceback" not in res.err, res
    assert (tiny_grads_ws / "out" / "report" / f"composition-{T}.png").stat().st_size > 0


def test_zero_bbh_examples_means_all(tiny_ws):
    from lessctl.config import load_config

    cfg = load_config(tiny_ws / "lessctl.toml", overrides={"eval.bbh_examples_per_task": 0})
    assert cfg.eval.bbh_examples_per_task == 0
    from lessctl.evaluation.runner import task_options

    assert task_options(cfg.eval, "bbh")["examples_per_task"] is None
