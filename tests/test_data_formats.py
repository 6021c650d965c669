"""Data files as users have them (jsonl, jsonl.gz, parquet) and what the cut at max_seq_length costs."""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lessctl.data import records as records_mod
from lessctl.data.encoding import (
    IGNORE_INDEX,
    LOST_LABEL_SHARE_WARNING,
    TruncationReport,
    encode_record,
    encode_target,
    join_prompt_completion,
)
from lessctl.data.pool import encode_training_set
from lessctl.data.records import Record, data_stem, read_examples, text_lines
from lessctl.data.targets import load_target
from lessctl.errors import InputError, LogFormatter

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict:
    from lessctl.tiny import write_tiny_data

    return write_tiny_data(tmp_path_factory.mktemp("tinydata"))


@pytest.fixture(scope="module")
def tok(tiny_data, tmp_path_factory):
    """The tiny preset's tokenizer, built as `init --preset tiny` builds it and loaded like a user's."""
    from lessctl.models import load_tokenizer
    from lessctl.tiny import corpus_texts, train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    texts = corpus_texts(list(tiny_data["train"].values()) + list(tiny_data["targets"].values()))
    train_tokenizer(texts, out)
    return load_tokenizer(out)


def write_gz(src: Path, dst: Path) -> Path:
    with gzip.open(dst, "wb") as f:
        f.write(src.read_bytes())
    return dst


def write_parquet(rows: list[dict], dst: Path, row_group_size: int = 7) -> Path:
    """The rows as a parquet of every key any row has (a null where a row lacks one), as data set exports are."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
    pq.write_table(table, dst, row_group_size=row_group_size)
    return dst


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def three_formats(src: Path, d: Path) -> dict[str, Path]:
    """`src` (a jsonl file without blank lines) as .jsonl, .jsonl.gz and .parquet in `d`."""
    d.mkdir(parents=True, exist_ok=True)
    stem = data_stem(src)
    jl = d / f"{stem}.jsonl"
    shutil.copyfile(src, jl)
    return {
        "jsonl": jl,
        "gz": write_gz(src, d / f"{stem}.jsonl.gz"),
        "parquet": write_parquet(jsonl_rows(src), d / f"{stem}.parquet"),
    }


# --------------------------------------------------------------------------- reading every format


def test_every_format_reads_the_same_examples(tiny_data, tmp_path, monkeypatch):
    files = three_formats(tiny_data["train"]["synth_a"], tmp_path)
    batches: list[int] = []
    real = pq.ParquetFile.iter_batches

    def counting(self, *a, **kw):  # the real reader, its batch sizes recorded
        for b in real(self, *a, **kw):
            batches.append(b.num_rows)
            yield b

    monkeypatch.setattr(records_mod, "PARQUET_BATCH_ROWS", 5)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    got = {k: read_examples(p) for k, p in files.items()}
    want = got["jsonl"]
    assert len(want) == 180
    for k in ("gz", "parquet"):
        assert [(r.line, r.data) for r in got[k]] == [(r.line, r.data) for r in want], k
        assert [json.loads(r.raw) for r in got[k]] == [r.data for r in want]
    assert [r.raw for r in got["gz"]] == [r.raw for r in want]  # gzip: the very lines
    assert sum(batches) == 180 and max(batches) <= 5 and len(batches) >= 36  # parquet: a few rows at a time


def test_parquet_nulls_are_absent_keys(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "family": "x"},
        {"prompt": "p", "completion": "c"},  # no messages, no family: nulls in the parquet
    ]
    recs = read_examples(write_parquet(rows, tmp_path / "mixed.parquet"))
    assert [r.data for r in recs] == rows
    assert json.loads(recs[1].raw) == {"prompt": "p", "completion": "c"}


def test_gzip_is_read_as_a_stream(tmp_path):
    rng = random.Random(0)
    lines = [json.dumps({"prompt": f"{i} {rng.random()}", "completion": str(rng.random())}) + "\n" for i in range(6000)]
    src = tmp_path / "big.jsonl"
    src.write_text("".join(lines))
    gz = write_gz(src, tmp_path / "big.jsonl.gz")
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])  # cut short: the first half still reads
    seen = []
    with pytest.raises(InputError) as exc:
        for n, line in text_lines(gz):
            assert line == lines[n - 1]
            seen.append(n)
    assert len(seen) > 1000
    assert str(exc.value).startswith(f"{gz}:{len(seen) + 1}: the gzip data is damaged or cut short")


def test_damaged_parquet_names_the_first_row_of_the_damaged_row_group(tiny_data, tmp_path):
    p = write_parquet(jsonl_rows(tiny_data["train"]["synth_a"]), tmp_path / "x.parquet", row_group_size=50)
    data = bytearray(p.read_bytes())
    start = pq.ParquetFile(p).metadata.row_group(2).column(0).data_page_offset  # rows 101-150
    data[start + 20 : start + 60] = bytes(b ^ 0xFF for b in data[start + 20 : start + 60])
    p.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"x\.parquet row 101: cannot be read \(.*\); the file is damaged$"):
        read_examples(p)


def test_data_stem():
    assert [data_stem(p) for p in ("a/cot.jsonl", "cot.jsonl.gz", "x/cot.parquet", "cot.json", "c.gz")] == [
        "cot",
        "cot",
        "cot",
        "cot",
        "c",
    ]


def _gz_lines(tmp_path: Path, lines: list[bytes]) -> Path:
    p = tmp_path / "x.jsonl.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return p


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def _rows_with(bad: dict, at: int = 17, n: int = 20) -> list[dict]:
    return [bad if i == at - 1 else {**GOOD, "id": str(i)} for i in range(n)]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: _gz_lines(d, [json.dumps(GOOD).encode(), b'{"messages": [oops']), "x.jsonl.gz:2: invalid JSON"),
        (lambda d: _gz_lines(d, [json.dumps(GOOD).encode(), b'{"prompt": "\xff"}']), "x.jsonl.gz:2: byte 0xff"),
        (lambda d: _gz_lines(d, [json.dumps(GOOD).encode(), b'{"id": 1}']), "x.jsonl.gz:2: expected 'messages'"),
        (
            lambda d: (
                (d / "x.jsonl.gz").write_bytes(gzip.compress(json.dumps(GOOD).encode() * 50)[:40]) and d / "x.jsonl.gz"
            ),
            "x.jsonl.gz:1: the gzip data is damaged or cut short",
        ),
        (
            lambda d: (d / "x.jsonl.gz").write_bytes(json.dumps(GOOD).encode()) and d / "x.jsonl.gz",
            "x.jsonl.gz:1: the gzip data is damaged or cut short (Not a gzipped file",
        ),
        (
            lambda d: (d / "x.parquet").write_bytes(b"PAR1 but not parquet") and d / "x.parquet",
            "x.parquet: not a readable parquet file",
        ),
        (
            lambda d: write_parquet([{"text": "a", "label": 1}], d / "x.parquet"),
            "x.parquet: the parquet file has no 'messages' or 'prompt'+'completion' column (its columns: label, text)",
        ),
        (
            lambda d: write_parquet(_rows_with({"messages": [{"role": "bot", "content": "x"}]}), d / "x.parquet"),
            "x.parquet row 17: messages[0] has unknown role 'bot'",
        ),
        (
            lambda d: write_parquet(_rows_with({"messages": [{"role": "user", "content": None}]}), d / "x.parquet"),
            "x.parquet row 17: messages[0].content must be a string",
        ),
        (
            lambda d: write_parquet(_rows_with({"messages": []}, at=3), d / "x.parquet"),
            "x.parquet row 3: 'messages' must be a non-empty list",
        ),
        (lambda d: _empty_parquet(d), "x.parquet: the file holds no examples"),
    ],
    ids=[
        "gz-bad-json",
        "gz-not-utf8",
        "gz-no-messages",
        "gz-cut-short",
        "gz-not-gzip",
        "parquet-not-parquet",
        "parquet-no-messages-column",
        "parquet-bad-role",
        "parquet-null-content",
        "parquet-empty-messages",
        "parquet-no-rows",
    ],
)
def test_bad_files_name_file_and_line_or_row(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError) as exc:
        read_examples(path)
    assert str(exc.value).startswith(str(tmp_path / "x")), exc.value
    assert message in str(exc.value), exc.value
    assert "\n" not in str(exc.value)


def _empty_parquet(d: Path) -> Path:
    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
    pq.write_table(schema.empty_table(), d / "x.parquet")
    return d / "x.parquet"


def test_custom_target_in_every_format(tiny_data, tmp_path):
    files = three_formats(tiny_data["targets"]["sorting"], tmp_path)
    got = {k: load_target({"file": str(p)}, tmp_path, "sorting") for k, p in files.items()}
    assert got["gz"] == got["jsonl"] and got["parquet"] == got["jsonl"] and len(got["jsonl"]) > 0
    rows = jsonl_rows(files["jsonl"])
    rows[2] = {"messages": [{"role": "user", "content": "no answer"}]}
    bad = write_parquet(rows, tmp_path / "bad_target.parquet")
    with pytest.raises(InputError, match=r"bad_target\.parquet row 3: the last message must be the assistant's"):
        load_target({"file": str(bad)}, tmp_path, "sorting")


def test_training_set_is_the_same_from_every_format(tiny_data, tok, tmp_path):
    want = None
    for fmt in ("jsonl", "gz", "parquet"):
        files = {n: three_formats(p, tmp_path / fmt)[fmt] for n, p in tiny_data["train"].items()}
        examples, counts, report = encode_training_set(files, tok, 128, "tulu", 0.25, 3)
        got = ([(e.source, e.line, e.input_ids, e.labels) for e in examples], counts, report)
        if want is None:
            want = got
        assert got == want, fmt
    assert want[1] == {"pool": 360, "subset": 90, "dropped_no_labels": 0}


def test_pool_as_gz_and_parquet_gives_the_same_store_rows(tiny_ws, cli):
    ws = tiny_ws
    src = ws / "data" / "synth_a.jsonl"
    short = ws / "data" / "a.jsonl"
    short.write_text("".join(src.read_text().splitlines(keepends=True)[:40]))
    write_gz(short, ws / "data" / "a_gz.jsonl.gz")
    write_parquet(jsonl_rows(short), ws / "data" / "a_pq.parquet")
    toml = ws / "lessctl.toml"
    text = toml.read_text()
    old = 'train = {synth_a = "data/synth_a.jsonl", synth_b = "data/synth_b.jsonl"}'
    assert old in text
    toml.write_text(
        text.replace(old, 'train = {a = "data/a.jsonl", a_gz = "data/a_gz.jsonl.gz", a_pq = "data/a_pq.parquet"}')
    )
    step = json.loads((ws / "out" / "warmup" / "checkpoints.json").read_text())[-1]["step"]
    res = cli(
        "--config", toml, "grads", "--train", "a", "--train", "a_gz", "--train", "a_pq", "--ckpt", step,
        "--dims", "64", "--projector", "basic", "--device", "cpu", "--json",
    )  # fmt: skip
    assert res.code == 0, res
    stores = json.loads(res.out)["stores"]
    assert [s["status"] for s in stores] == ["written"] * 3
    assert stores[0]["truncation"] == stores[1]["truncation"] == stores[2]["truncation"]
    data = {}
    for name in ("a", "a_gz", "a_pq"):
        with h5py.File(ws / "out" / "grads" / f"{name}-ckpt{step}-adam.h5") as f:
            data[name] = (f["index"][:], f["dim64/features"][:], f["dim64/norms"][:])
            assert f.attrs["source"].endswith({"a": ".jsonl", "a_gz": ".jsonl.gz", "a_pq": ".parquet"}[name])
    assert len(data["a"][0]) == 40 and np.abs(data["a"][1]).sum() > 0
    for name in ("a_gz", "a_pq"):
        for got, want in zip(data[name], data["a"]):
            np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- what truncation costs


def test_truncation_counts_are_exact(tok):
    """Records of known token lengths: n tokens in all, p of them the (masked) prompt; cut at L."""
    L = 40
    prompts = ["Repeat the fruit:"] * 5 + ["Read this: " + "pear " * 60 + "then answer:"]
    completions = [" ".join(["apple"] * k) for k in (2, 10, 25, 39, 80)] + ["yes"]
    recs = [Record(i, "", {"prompt": p, "completion": c}) for i, (p, c) in enumerate(zip(prompts, completions))]
    want = TruncationReport(L)
    for rec, p, c in zip(recs, prompts, completions):
        full = tok(join_prompt_completion(p, c) + tok.eos_token)["input_ids"]
        n_prompt = len(tok(p)["input_ids"])
        assert full[:n_prompt] == tok(p)["input_ids"]  # the prompt's tokens are the first n_prompt
        n = len(full)
        labels_full = n - n_prompt  # positions n_prompt..n-1 (never position 0: the prompt holds <s>)
        labels_kept = max(0, min(n, L) - n_prompt)
        enc = encode_record(rec, tok, L)
        assert (
            enc.input_ids
            == tok(join_prompt_completion(p, c) + tok.eos_token, max_length=L, truncation=True)["input_ids"]
        )
        assert (enc.untruncated_tokens, enc.untruncated_label_tokens, enc.n_label_tokens) == (
            n,
            labels_full,
            labels_kept,
        )
        assert enc.truncated == (n > L)
        want.examples += 1
        want.label_tokens += labels_full
        if n > L:
            want.truncated += 1
            want.truncated_label_tokens += labels_full
            want.lost_label_tokens += labels_full - labels_kept
    got = TruncationReport.of([encode_record(r, tok, L) for r in recs], L)
    assert got == want
    assert got.truncated == 3 and got.examples == 6  # 39 and 80 apples, and the long prompt
    assert got.lost_label_share == want.lost_label_tokens / want.label_tokens
    assert got.lost_label_share_of_truncated == want.lost_label_tokens / want.truncated_label_tokens
    d = got.to_dict()
    assert TruncationReport.from_dict(d) == got and d["lost_label_share"] == round(got.lost_label_share, 6)


def test_truncation_of_conversations_matches_the_untruncated_encoding(tok):
    """For chat records the untruncated counts are those of an encoding that cuts nothing."""
    msgs = [
        {"role": "user", "content": "List: " + "river " * 12},
        {"role": "assistant", "content": "stone " * 15},
        {"role": "user", "content": "Again, longer: " + "lemon " * 10},
        {"role": "assistant", "content": "tiger " * 30},
    ]
    rec = Record(0, "", {"messages": msgs})
    whole = encode_record(rec, tok, 10_000)
    assert not whole.truncated and whole.untruncated_label_tokens == whole.n_label_tokens
    for L in (8, 30, 60, 90, len(whole.input_ids)):
        enc = encode_record(rec, tok, L)
        assert enc.input_ids == whole.input_ids[:L] and enc.labels == whole.labels[:L]
        assert enc.untruncated_tokens == len(whole.input_ids)
        assert enc.untruncated_label_tokens == whole.n_label_tokens
        assert enc.n_label_tokens == sum(1 for x in whole.labels[1:L] if x != IGNORE_INDEX)


def test_cut_of_a_tokenizer_that_appends_eos_is_its_own_truncation(tok, tmp_path):
    """A tokenizer whose special tokens follow the text: the cut keeps what its truncation keeps."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok.save_pretrained(tmp_path / "t")
    fast = PreTrainedTokenizerFast.from_pretrained(tmp_path / "t")
    bos, eos = fast.bos_token_id, fast.eos_token_id
    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    prompt, completion = "Fruit:", " ".join(["apple"] * 30)
    want = fast(prompt + completion, max_length=12, truncation=True)["input_ids"]
    ids, labels = encode_target(prompt, completion, fast, 12)
    assert ids == want and ids[-1] == eos
    n_prompt = min(len(fast(prompt)["input_ids"]), len(ids))  # LESS's count: the prompt's own encoding, </s> too
    assert labels == [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    ids, labels = encode_target(prompt, completion, fast, 40)  # nothing cut: the whole encoding
    assert ids == fast(prompt + completion)["input_ids"]


def _cot_rows(data_dir: Path, n: int) -> list[str]:
    lines = (data_dir / "train" / "processed" / "cot" / "cot_data.jsonl").read_text().splitlines(keepends=True)
    return lines[:n]


def test_tiny_preset_cut_of_real_cot_records_warns(data_dir, tok, tmp_path, caplog):
    cot = tmp_path / "cot.jsonl"
    cot.write_text("".join(_cot_rows(data_dir, 200)))
    with caplog.at_level(logging.INFO, logger="lessctl.data"):
        _, _, report = encode_training_set({"cot": cot}, tok, 128, "tulu", 1.0, 3)
    assert report.truncated > 0.8 * report.examples and report.lost_label_share > LOST_LABEL_SHARE_WARNING
    fmt = LogFormatter("%(name)s: %(message)s")
    warnings = [fmt.format(r) for r in caplog.records if fmt.format(r).startswith("warning:")]
    assert len(warnings) == 2, warnings  # the cut, then the examples it left without labels
    line = warnings[0]
    assert warnings[1].startswith("warning: ") and "of 200 examples have no trainable tokens" in warnings[1]
    assert line.startswith(f"warning: training set cot: max_seq_length 128 cut {report.truncated} of 200 examples; ")
    assert f"{report.lost_label_share:.1%} of the label tokens lost" in line and "max_seq_length" in line


def test_nothing_cut_no_warning(tiny_data, tok, caplog):
    with caplog.at_level(logging.INFO, logger="lessctl.data"):
        _, _, report = encode_training_set(tiny_data["train"], tok, 128, "tulu", 1.0, 3)
    assert report.truncated == 0 and report.lost_label_tokens == 0 and report.label_tokens > 0
    assert not [r for r in caplog.records if r.name.startswith("lessctl.data")]


def test_grads_warns_once_on_stderr_and_records_the_cut_in_the_store(tiny_ws, data_dir):
    """The real command in its own process: one `warning:` line for the cut data set, none for the other."""
    ws = tiny_ws
    (ws / "data" / "cot.jsonl").write_text("".join(_cot_rows(data_dir, 40)))
    toml = ws / "lessctl.toml"
    text = toml.read_text()
    toml.write_text(text.replace("train = {synth_a", 'train = {cot = "data/cot.jsonl", synth_a', 1))
    steps = [c["step"] for c in json.loads((ws / "out" / "warmup" / "checkpoints.json").read_text())]
    cmd = [sys.executable, "-m", "lessctl.cli", "--config", str(toml), "grads", "--train", "cot", "--train", "synth_a"]
    cmd += ["--dims", "64", "--projector", "basic", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, res.stderr  # once for both checkpoints
    assert warnings[0].startswith("warning: cot: max_seq_length 128 cut ")
    with h5py.File(ws / "out" / "grads" / f"cot-ckpt{steps[0]}-adam.h5") as f:
        a = dict(f.attrs)
    with h5py.File(ws / "out" / "grads" / f"synth_a-ckpt{steps[0]}-adam.h5") as f:
        b = dict(f.attrs)
    assert a["truncated_examples"] > 30 and a["lost_label_tokens"] > 0 and a["label_tokens"] > a["lost_label_tokens"]
    assert b["truncated_examples"] == 0 and b["lost_label_tokens"] == 0
    assert f"cot: max_seq_length 128 cut {a['truncated_examples']} of 40 examples" in res.stderr


def test_finetune_reports_and_records_the_cut(tiny_ws, data_dir, cli):
    ws = tiny_ws
    src = ws / "cot.jsonl"
    src.write_text("".join(_cot_rows(data_dir, 24)))
    write_gz(src, ws / "cot.jsonl.gz")
    res = cli("--config", ws / "lessctl.toml", "finetune", "--train-file", ws / "cot.jsonl.gz", "--epochs", "1",
              "--device", "cpu", "--json")  # fmt: skip
    assert res.code == 0, res
    out = json.loads(res.out)
    assert out["output_dir"].endswith("/finetune/cot")  # named without .jsonl.gz
    run = json.loads((ws / "out" / "finetune" / "cot" / "lessctl_run.json").read_text())
    assert run["truncation"] == out["truncation"] and run["counts"]["subset"] == 24
    t = run["truncation"]
    assert t["max_seq_length"] == 128 and t["examples"] == 24 and 0 < t["truncated"] <= 24
    assert 0 < t["lost_label_tokens"] <= t["truncated_label_tokens"] <= t["label_tokens"]
    assert t["lost_label_share"] == round(t["lost_label_tokens"] / t["label_tokens"], 6)
    res = cli("--config", ws / "lessctl.toml", "finetune", "--train-file", ws / "cot.jsonl.gz", "--name", "c2",
              "--epochs", "1", "--device", "cpu")  # fmt: skip
    assert res.code == 0, res
    assert f"training set: max_seq_length 128 cut {t['truncated']} of 24 examples; " in res.err


def test_stores_without_truncation_attributes_still_read(tiny_grads_ws, cli):
    ws = tiny_grads_ws
    for p in (ws / "out" / "grads").glob("*.h5"):
        with h5py.File(p, "r+") as f:
            assert f.attrs["truncated_examples"] == 0 and f.attrs["label_tokens"] > 0
            for k in ("truncated_examples", "label_tokens", "truncated_label_tokens", "lost_label_tokens"):
                del f.attrs[k]  # as stores were written before these were kept
    cfg = ("--config", ws / "lessctl.toml")
    res = cli(*cfg, "grads", "--projector", "basic", "--dims", "64", "128", "--device", "cpu", "--json")
    assert res.code == 0, res
    stores = json.loads(res.out)["stores"]
    assert stores and all(s["status"] == "skipped" and s["truncation"] is None for s in stores)
    assert cli(*cfg, "store", "verify").code == 0
    assert cli(*cfg, "match", "--target", "sorting").code == 0


def test_ir_eval_file_in_every_format(tmp_path):
    from lessctl.evaluation.ranking import dataset_name, read_eval_file

    rows = [
        {
            "dataset": "scifact" if i else None,
            "messages": [{"role": "user", "content": f"rank {i}"}, {"role": "assistant", "content": "[B] > [A]"}],
            "candidates": [
                {"label": "A", "doc_id": f"d{i}", "grade": 0, "bm25_rank": 1},
                {"label": "B", "doc_id": f"e{i}", "grade": 2, "bm25_rank": 2},
            ],
        }
        for i in range(3)
    ]
    src = tmp_path / "sci_eval.jsonl"
    src.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    files = three_formats(src, tmp_path / "f")
    got = {k: read_eval_file(p) for k, p in files.items()}
    assert got["gz"] == got["jsonl"] == got["parquet"] and len(got["jsonl"]) == 3
    assert {dataset_name(p, got[k][:1]) for k, p in files.items()} == {"sci"}  # the name without _eval.<suffix>
    rows[1]["candidates"] = None
    bad = write_parquet(rows, tmp_path / "bad_eval.parquet")
    with pytest.raises(InputError, match=r"bad_eval\.parquet row 2: expected "):
        read_eval_file(bad)
