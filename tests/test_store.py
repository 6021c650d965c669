"""Tests for the HDF5 gradient store: round trip, size, refusal, resume (also after kill -9), shards, verify, ls."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from lessctl.errors import AlreadyExistsError, InputError, LessctlError, MissingArtifactError
from lessctl.files import sha256_file
from lessctl.grads.store.reader import StoreReader, list_stores, open_store, verify_store
from lessctl.grads.store.schema import parse_store_name, part_path, store_complete, store_path
from lessctl.grads.store.writer import StoreWriter

DIMS = [8, 16]
PROJECTOR = {"kind": "basic", "seed": 0, "block_size": 128, "model_id": 0, "dtype": "float16", "sm_count": None}


def make_rows(n: int, dims=DIMS, seed: int = 0) -> dict[int, np.ndarray]:
    """Deterministic unnormalized features {dim: [n, dim] float32}, with row 3 all zeros."""
    rng = np.random.default_rng(seed)
    out = {d: (rng.standard_normal((n, d)) * rng.uniform(0.1, 50, (n, 1))).astype(np.float32) for d in dims}
    for x in out.values():
        x[3] = 0
    return out


def make_attrs(sha: str = "ab" * 32, **extra) -> dict:
    attrs = dict(
        base_model="tiny",
        checkpoint="/ckpt/checkpoint-105",
        step=105,
        grad_type="sgd",
        source="/data/pool.jsonl",
        source_sha256=sha,
        projector=dict(PROJECTOR),
    )
    attrs.update(extra)
    return attrs


def write_store(path: Path, rows: dict, index: np.ndarray, batch: int = 7, attrs=None, **kw) -> Path:
    with StoreWriter(path, dims=DIMS, index=index, attrs=attrs or make_attrs(), **kw) as w:
        for a in range(w.rows_completed, len(index), batch):
            w.write({d: x[a : a + batch] for d, x in rows.items()})
    return path


def assert_same_data(a: Path, b: Path) -> None:
    with StoreReader([a]) as ra, StoreReader([b]) as rb:
        np.testing.assert_array_equal(ra.index, rb.index)
        for d in DIMS:
            np.testing.assert_array_equal(ra.read(d), rb.read(d))
            np.testing.assert_array_equal(ra.norms(d), rb.norms(d))


def test_names_round_trip(tmp_path):
    p = store_path(tmp_path, "my-data_set-ckpt2", 105, "adam")
    assert p == tmp_path / "my-data_set-ckpt2-ckpt105-adam.h5"
    assert parse_store_name(p.name) == ("my-data_set-ckpt2", 105, "adam", None)
    s = store_path(tmp_path, "a-b", 7, "sign", shard=(2, 3))
    assert s.name == "a-b-ckpt7-sign-shard2of3.h5"
    assert parse_store_name(s.name + ".part") == ("a-b", 7, "sign", (2, 3))
    assert parse_store_name("a-ckpt1-other.h5") is None
    assert parse_store_name("notes.txt") is None
    with pytest.raises(ValueError):
        store_path(tmp_path, "x", 1, "sgd", shard=(4, 3))


def test_sha256_file(tmp_path):
    import hashlib

    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(3_000_000))
    assert sha256_file(p, block_size=4096) == hashlib.sha256(p.read_bytes()).hexdigest()


def test_round_trip(tmp_path):
    n = 50
    rows, index = make_rows(n), np.arange(0, 2 * n, 2, dtype=np.int64)
    path = write_store(store_path(tmp_path, "pool", 105, "sgd"), rows, index)
    assert path.exists() and not part_path(path).exists()
    assert store_complete(path)
    with open_store(tmp_path, "pool", 105, "sgd") as r:
        assert r.n_rows == n and r.dims == DIMS and r.paths == [path]
        np.testing.assert_array_equal(r.index, index)
        assert r.index.dtype == np.int64
        for d in DIMS:
            feats, norms = r.read(d), r.norms(d)
            assert feats.dtype == np.float16 and feats.shape == (n, d) and norms.dtype == np.float32
            ref = np.linalg.norm(rows[d], axis=1)
            np.testing.assert_allclose(norms, ref, rtol=1e-6)
            lengths = np.linalg.norm(feats.astype(np.float32), axis=1)
            assert norms[3] == 0 and not feats[3].any() and np.isfinite(feats).all()
            np.testing.assert_allclose(np.delete(lengths, 3), 1, atol=1e-2)
            # unnormalized rows are recoverable: features * norms
            np.testing.assert_allclose(
                feats.astype(np.float32) * norms[:, None], rows[d], rtol=2e-3, atol=1e-3 * ref.max()
            )
            chunks = list(r.iter_chunks(d, rows=16))
            assert [s for s, _ in chunks] == [0, 16, 32, 48]
            np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), feats)
        a = r.attrs
        assert a["format_version"] == 1 and a["complete"] is True and a["rows_completed"] == n == a["n_rows"]
        assert a["step"] == 105 and a["grad_type"] == "sgd" and a["base_model"] == "tiny"
        assert a["checkpoint"] == "/ckpt/checkpoint-105" and a["source"] == "/data/pool.jsonl"
        assert a["num_shards"] == 1 and a["total_rows"] == n and isinstance(a["lessctl_version"], str)
        assert r.projector == PROJECTOR
    with h5py.File(path, "r") as f:  # the raw layout of the contract
        assert f["dim8/features"].dtype == np.float16 and f["dim16/norms"].shape == (n,)
        assert f.attrs["projector_kind"] == "basic" and f.attrs["shard"] == 1 and f.attrs["row_start"] == 0
    assert verify_store(path) == []


def test_torch_input_and_bad_batches(tmp_path):
    torch = pytest.importorskip("torch")
    rows = make_rows(4)
    path = tmp_path / "t-ckpt105-sign.h5"
    w = StoreWriter(path, dims=DIMS, index=np.arange(4), attrs=make_attrs(grad_type="sign"))
    with pytest.raises(ValueError):
        w.write({8: rows[8]})  # a dimension missing
    with pytest.raises(ValueError):
        w.write({d: np.zeros((5, d), np.float32) for d in DIMS})  # past n_rows
    with pytest.raises(LessctlError, match="non-finite"):
        w.write({d: np.full((1, d), np.nan, np.float32) for d in DIMS})
    assert w.rows_completed == 0
    w.write({d: torch.from_numpy(x).to(torch.bfloat16) for d, x in rows.items()})
    with pytest.raises(ValueError):
        w.write({d: np.zeros((1, d), np.float32) for d in DIMS})
    w.finalize()
    assert verify_store(path) == []


def test_size_close_to_payload(tmp_path):
    n, dims = 3000, [256, 512]
    rng = np.random.default_rng(1)
    path = tmp_path / "big-ckpt105-adam.h5"
    with StoreWriter(path, dims=dims, index=np.arange(n), attrs=make_attrs(grad_type="adam")) as w:
        for _ in range(0, n, 500):
            w.write({d: rng.standard_normal((500, d)).astype(np.float32) for d in dims})
    payload = sum(2 * n * d + 4 * n for d in dims) + 8 * n
    size = path.stat().st_size
    assert payload <= size < payload * 1.02 + 64 * 1024


def test_existing_complete_store_refused(tmp_path):
    rows, index = make_rows(10), np.arange(10)
    path = write_store(tmp_path / "p-ckpt105-sgd.h5", rows, index)
    with pytest.raises(AlreadyExistsError, match="--force"):
        StoreWriter(path, dims=DIMS, index=index, attrs=make_attrs())
    other = make_rows(10, seed=5)
    write_store(path, other, index, force=True)
    with StoreReader([path]) as r:
        np.testing.assert_allclose(r.norms(8), np.linalg.norm(other[8], axis=1), rtol=1e-6)


def test_resume_refuses_changed_source(tmp_path):
    rows, index = make_rows(20), np.arange(20)
    path = tmp_path / "p-ckpt105-sgd.h5"
    w = StoreWriter(path, dims=DIMS, index=index, attrs=make_attrs())
    w.write({d: x[:5] for d, x in rows.items()})
    w.close()
    with pytest.raises(InputError, match="source file /data/pool.jsonl changed") as e:
        StoreWriter(path, dims=DIMS, index=index, attrs=make_attrs(sha="cd" * 32))
    assert "--force" in str(e.value)
    with pytest.raises(InputError, match="projector_seed"):
        StoreWriter(path, dims=DIMS, index=index, attrs=make_attrs(projector={**PROJECTOR, "seed": 1}))
    with pytest.raises(InputError, match="dims"):
        StoreWriter(path, dims=[8], index=index, attrs=make_attrs())
    with pytest.raises(InputError, match="step"):
        StoreWriter(path, dims=DIMS, index=index, attrs=make_attrs(step=106))
    w = StoreWriter(path, dims=DIMS, index=index, attrs=make_attrs(sha="cd" * 32), force=True)
    assert w.rows_completed == 0
    w.close()


def test_resume_equals_uninterrupted(tmp_path):
    n = 40
    rows, index = make_rows(n), np.arange(n) * 3
    ref = write_store(tmp_path / "ref" / "p-ckpt105-sgd.h5", rows, index, batch=9)
    path = tmp_path / "p-ckpt105-sgd.h5"
    w = StoreWriter(path, dims=DIMS, index=index, attrs=make_attrs())
    for a in (0, 6, 12):
        w.write({d: x[a : a + 6] for d, x in rows.items()})
    w.close()
    assert not store_complete(part_path(path))
    with pytest.raises(MissingArtifactError, match="incomplete.*resumes"):
        open_store(tmp_path, "p", 105, "sgd")
    w = StoreWriter(path, dims=DIMS, index=index, attrs=make_attrs())
    assert w.rows_completed == 18
    with w:
        for a in range(w.rows_completed, n, 5):
            w.write({d: x[a : a + 5] for d, x in rows.items()})
    assert verify_store(path) == []
    assert_same_data(path, ref)


KILL_CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from test_store import make_rows, make_attrs, DIMS
    from lessctl.grads.store.writer import StoreWriter
    n = {n}
    rows = make_rows(n)
    w = StoreWriter({path!r}, dims=DIMS, index=np.arange(n), attrs=make_attrs())
    while w.rows_completed < n:
        a = w.rows_completed
        w.write({{d: x[a : a + 3] for d, x in rows.items()}})
        print(w.rows_completed, flush=True)
    w.finalize()
    """
)


@pytest.mark.parametrize("kill_after", [30, 301])
def test_resume_after_kill_9(tmp_path, kill_after):
    n = 3000
    path = tmp_path / "p-ckpt105-sgd.h5"
    script = KILL_CHILD.format(tests=str(Path(__file__).parent), n=n, path=str(path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if int(line) >= kill_after:
                os.kill(child.pid, signal.SIGKILL)
                break
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the child finished before it was killed"
    assert not path.exists() and part_path(path).exists()
    rows = make_rows(n)
    with StoreWriter(path, dims=DIMS, index=np.arange(n), attrs=make_attrs()) as w:
        assert kill_after <= w.rows_completed < n
        for a in range(w.rows_completed, n, 250):
            w.write({d: x[a : a + 250] for d, x in rows.items()})
    ref = write_store(tmp_path / "ref" / path.name, rows, np.arange(n), batch=1000)
    assert verify_store(path) == []
    assert_same_data(path, ref)


def test_part_in_use_by_another_process(tmp_path):
    path = tmp_path / "p-ckpt105-sgd.h5"
    holder = textwrap.dedent(
        f"""
        import sys, time, numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_store import make_attrs, DIMS
        from lessctl.grads.store.writer import StoreWriter
        w = StoreWriter({str(path)!r}, dims=DIMS, index=np.arange(10), attrs=make_attrs())
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(LessctlError, match="open in another process"):
            StoreWriter(path, dims=DIMS, index=np.arange(10), attrs=make_attrs())
        assert part_path(path).exists()  # the other process's work was left alone
        assert list_stores(tmp_path)[0]["complete"] is False  # readers do not block on the lock
    finally:
        child.kill()
        child.wait(timeout=60)


def test_unreadable_part_starts_over(tmp_path, caplog):
    path = tmp_path / "p-ckpt105-sgd.h5"
    part_path(path).write_bytes(b"not hdf5 at all")
    rows = make_rows(10)
    with caplog.at_level("WARNING", logger="lessctl.grads.store"):
        w = StoreWriter(path, dims=DIMS, index=np.arange(10), attrs=make_attrs())
    assert w.rows_completed == 0 and "starting over" in caplog.text
    w.write(rows)
    w.finalize()
    assert verify_store(path) == []


def write_shards(tmp_path, rows, index, bounds, skip=()):
    n = len(bounds) - 1
    for k in range(1, n + 1):
        if k in skip:
            continue
        a, b = bounds[k - 1], bounds[k]
        attrs = make_attrs(shard=k, num_shards=n, row_start=a, total_rows=len(index))
        path = store_path(tmp_path, "pool", 105, "sgd", shard=(k, n))
        write_store(path, {d: x[a:b] for d, x in rows.items()}, index[a:b], batch=4, attrs=attrs)


def test_shards_read_as_one(tmp_path):
    n = 31
    rows, index = make_rows(n), np.arange(n) + 100
    ref = write_store(tmp_path / "ref" / "pool-ckpt105-sgd.h5", rows, index)
    write_shards(tmp_path, rows, index, [0, 10, 20, 31])
    with open_store(tmp_path, "pool", 105, "sgd") as r, StoreReader([ref]) as rr:
        assert len(r.paths) == 3 and r.n_rows == n and r.dims == DIMS
        assert r.attrs["num_shards"] == 3 and r.attrs["n_rows"] == n and r.projector == PROJECTOR
        np.testing.assert_array_equal(r.index, rr.index)
        for d in DIMS:
            np.testing.assert_array_equal(r.read(d), rr.read(d))
            np.testing.assert_array_equal(r.norms(d), rr.norms(d))
            starts = [s for s, _ in r.iter_chunks(d, rows=8)]
            assert starts == [0, 8, 10, 18, 20, 28]
            np.testing.assert_array_equal(np.concatenate([c for _, c in r.iter_chunks(d, rows=8)]), rr.read(d))
            for start, stop in ((0, 31), (5, 25), (9, 11), (10, 20), (30, 31), (7, 7)):  # across shard boundaries
                out = np.full((stop - start, d), np.nan, dtype=np.float16)
                r.read_into(d, start, out)
                np.testing.assert_array_equal(out, rr.read(d)[start:stop])
            with pytest.raises(ValueError):
                r.read_into(d, 25, np.empty((7, d), dtype=np.float16))  # past the end
            with pytest.raises(ValueError):
                r.read_into(d, 0, np.empty((4, d), dtype=np.float32))
        assert verify_store(r) == []


def test_missing_and_incomplete_shards(tmp_path):
    n = 30
    rows, index = make_rows(n), np.arange(n)
    with pytest.raises(MissingArtifactError, match="pool-ckpt105-sgd.h5"):
        open_store(tmp_path, "pool", 105, "sgd")
    write_shards(tmp_path, rows, index, [0, 10, 20, 30], skip=(2,))
    with pytest.raises(MissingArtifactError, match=r"pool-ckpt105-sgd-shard2of3\.h5.*lessctl grads .*--shard 2/3"):
        open_store(tmp_path, "pool", 105, "sgd")
    attrs = make_attrs(shard=2, num_shards=3, row_start=10, total_rows=n)
    w = StoreWriter(store_path(tmp_path, "pool", 105, "sgd", (2, 3)), dims=DIMS, index=index[10:20], attrs=attrs)
    w.write({d: x[10:12] for d, x in rows.items()})
    w.close()
    with pytest.raises(MissingArtifactError, match=r"shard 2/3.*incomplete.*--shard 2/3"):
        open_store(tmp_path, "pool", 105, "sgd")
    ls = list_stores(tmp_path)
    assert len(ls) == 1 and ls[0]["complete"] is False and ls[0]["rows_completed"] == 22 and ls[0]["total_rows"] == n


def test_inconsistent_shards(tmp_path):
    n = 20
    rows, index = make_rows(n), np.arange(n)
    write_shards(tmp_path, rows, index, [0, 10, 20], skip=(2,))
    attrs = make_attrs(shard=2, num_shards=2, row_start=10, total_rows=n, projector={**PROJECTOR, "seed": 9})
    write_store(
        store_path(tmp_path, "pool", 105, "sgd", (2, 2)), {d: x[10:] for d, x in rows.items()}, index[10:], attrs=attrs
    )
    with pytest.raises(InputError, match="projector_seed"):
        open_store(tmp_path, "pool", 105, "sgd")


def test_verify_detects_problems(tmp_path):
    rows, index = make_rows(12), np.arange(12)
    good = write_store(tmp_path / "p-ckpt105-sgd.h5", rows, index)
    assert verify_store(good) == []

    def broken(name, edit):
        p = tmp_path / name
        p.write_bytes(good.read_bytes())
        with h5py.File(p, "r+") as f:
            edit(f)
        return verify_store(p)

    def non_unit(f):
        f["dim8/features"][5] = np.full(8, 0.5, np.float16)  # length sqrt(2)

    def nan(f):
        f["dim16/features"][2, 4] = np.nan

    def incomplete(f):
        f.attrs.modify("complete", False)
        f.attrs.modify("rows_completed", 7)

    def bad_index(f):
        f["index"][4] = 2

    def bad_dtype(f):
        del f["dim8/norms"]
        f["dim8/norms"] = np.ones(12, np.float64)

    assert any("not unit-norm (first at row 5)" in p for p in broken("a.h5", non_unit))
    assert any("non-finite" in p and "row 2" in p for p in broken("b.h5", nan))
    problems = broken("c.h5", incomplete)
    assert any("not marked complete" in p for p in problems) and any("rows_completed=7" in p for p in problems)
    problems = broken("d.h5", bad_index)
    assert any("duplicate" in p for p in problems) and any("not increasing" in p for p in problems)
    assert any("dim8/norms must be float32" in p for p in broken("e.h5", bad_dtype))
    assert any("missing attributes" in p for p in broken("f.h5", lambda f: f.attrs.__delitem__("source_sha256")))
    (tmp_path / "g.h5").write_bytes(b"junk")
    assert "cannot be read" in verify_store(tmp_path / "g.h5")[0]


def test_list_stores(tmp_path):
    assert list_stores(tmp_path / "nothing") == []
    rows, index = make_rows(12), np.arange(12)
    write_store(store_path(tmp_path, "my-pool_a", 105, "adam"), rows, index, attrs=make_attrs(grad_type="adam"))
    write_shards(tmp_path, rows, index, [0, 6, 12])
    w = StoreWriter(store_path(tmp_path, "mmlu", 105, "sgd"), dims=DIMS, index=index, attrs=make_attrs())
    w.write({d: x[:5] for d, x in rows.items()})
    w.close()
    (tmp_path / "README.txt").write_text("not a store")
    ls = {(s["name"], s["grad_type"]): s for s in list_stores(tmp_path)}
    assert set(ls) == {("my-pool_a", "adam"), ("pool", "sgd"), ("mmlu", "sgd")}
    a = ls["my-pool_a", "adam"]
    assert a["complete"] and a["rows_completed"] == a["total_rows"] == 12 and a["dims"] == DIMS and a["step"] == 105
    assert a["rows"] == "12/12" and a["missing_shards"] == []
    assert a["projector"] == "basic" and a["num_shards"] == 1 and len(a["paths"]) == 1
    s = ls["pool", "sgd"]
    assert s["complete"] and s["num_shards"] == 2 and len(s["paths"]) == 2 and s["rows_completed"] == 12
    m = ls["mmlu", "sgd"]
    assert not m["complete"] and m["rows_completed"] == 5 and m["paths"][0].endswith(".h5.part")


def test_empty_store(tmp_path):
    path = tmp_path / "e-ckpt105-sgd.h5"
    with StoreWriter(path, dims=DIMS, index=np.zeros(0, np.int64), attrs=make_attrs()):
        pass
    assert verify_store(path) == []
    with open_store(tmp_path, "e", 105, "sgd") as r:
        assert r.n_rows == 0 and r.read(8).shape == (0, 8) and list(r.iter_chunks(8)) == []
