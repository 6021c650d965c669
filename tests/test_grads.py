"""The grads stage: batched per-example gradients, LESS's transforms, TRAK projection, resume, shards, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from lessctl.config import load_config
from lessctl.data import encode_record, read_jsonl
from lessctl.gradients import (
    AdamState,
    PerExampleGradients,
    load_adam_state,
    naive_gradients,
    token_batches,
    transform,
)
from lessctl.models import load_adapter_model
from lessctl.store import open_store, store_path


def _checkpoint(ws: Path) -> tuple[Path, int]:
    manifest = json.loads((ws / "out" / "warmup" / "checkpoints.json").read_text())
    step = manifest[-1]["step"]
    return ws / "out" / "warmup" / f"checkpoint-{step}", step


def _model(ws: Path):
    ckpt, _ = _checkpoint(ws)
    model, tok = load_adapter_model(ckpt, base=str(ws / "model"), dtype="fp32", device="cpu", trainable=True)
    model.eval()
    return model, tok


def _encoded(ws: Path, tok, n: int = 10):
    recs = read_jsonl(ws / "data" / "synth_a.jsonl")[:n]
    return [encode_record(r, tok, 128) for r in recs]


def test_batched_gradients_equal_batch_of_one(tiny_template):
    model, tok = _model(tiny_template)
    enc = _encoded(tiny_template, tok, 12)
    seqs, labels = [e.input_ids for e in enc], [e.labels for e in enc]
    assert len({len(s) for s in seqs}) > 1, "the batch must mix lengths so padding is exercised"
    peg = PerExampleGradients(model)
    try:
        batched, loss, count = peg(seqs, labels, tok.pad_token_id)
    finally:
        peg.remove()
    naive = naive_gradients(model, seqs, labels, tok.pad_token_id)
    assert batched.shape == naive.shape == (12, peg.grad_dim)
    rel = (batched - naive).norm(dim=1) / naive.norm(dim=1)
    assert rel.max().item() < 1e-4, rel
    assert (count > 0).all()
    # the per-example loss is the mean token loss HF computes for a batch of one
    one = model(input_ids=torch.tensor([seqs[0]]), labels=torch.tensor([labels[0]])).loss
    assert abs(one.item() - loss[0].item()) < 1e-5


def test_fully_masked_example_gives_zero_gradient(tiny_template):
    model, tok = _model(tiny_template)
    enc = _encoded(tiny_template, tok, 3)
    labels = [e.labels for e in enc]
    labels[1] = [-100] * len(labels[1])
    peg = PerExampleGradients(model)
    try:
        g, _, count = peg([e.input_ids for e in enc], labels, tok.pad_token_id)
    finally:
        peg.remove()
    assert count[1].item() == 0 and torch.count_nonzero(g[1]) == 0
    assert torch.count_nonzero(g[0]) > 0


def test_adam_transform_matches_hand_computation():
    g = torch.tensor([[0.5, -2.0, 0.0, 1e-3]])
    m = torch.tensor([0.1, 0.2, -0.3, 0.0])
    v = torch.tensor([0.01, 0.04, 0.09, 0.0])
    state = AdamState(m, v, 0.9, 0.999, 1e-8)
    got = transform(g, "adam", state)[0].tolist()
    for i in range(4):
        m1 = 0.9 * m[i].item() + 0.1 * g[0, i].item()
        v1 = 0.999 * v[i].item() + 0.001 * g[0, i].item() ** 2
        assert got[i] == pytest.approx(m1 / (v1 + 1e-8) ** 0.5, rel=1e-5)
    assert transform(g, "sgd") is g
    assert transform(g, "sign")[0].tolist() == [1.0, -1.0, 0.0, 1.0]


def test_token_batches_respect_budget():
    lengths = [5, 40, 12, 33, 7, 40, 1]
    batches = list(token_batches(lengths, 80))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 80 or len(b) == 1


def test_optimizer_state_by_position_and_by_name_agree(tiny_ws):
    model, _ = _model(tiny_ws)
    ckpt, _ = _checkpoint(tiny_ws)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    by_pos = load_adam_state(ckpt, params, "cpu")
    sd = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert all(isinstance(k, int) for k in sd["state"])  # a plain Trainer run keys by position
    names = [n for n, _ in params]
    sd["state"] = {names[k]: v for k, v in sd["state"].items()}  # the FSDP layout: keyed by name
    sd["param_groups"] = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    by_name_dir = tiny_ws / "by-name"
    by_name_dir.mkdir()
    torch.save(sd, by_name_dir / "optimizer.pt")
    by_name = load_adam_state(by_name_dir, params, "cpu")
    assert torch.equal(by_pos.exp_avg, by_name.exp_avg) and torch.equal(by_pos.exp_avg_sq, by_name.exp_avg_sq)
    assert (by_pos.beta1, by_pos.beta2, by_pos.eps) == (0.9, 0.999, 1e-8)
    assert by_pos.exp_avg.numel() == sum(p.numel() for _, p in params)


def test_stored_row_equals_trak_basic_projector_on_fp16_feature(tiny_grads_template):
    from trak.projectors import BasicProjector, ProjectionType

    ws = tiny_grads_template
    ckpt, step = _checkpoint(ws)
    model, tok = _model(ws)
    enc = _encoded(ws, tok, 3)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adam = load_adam_state(ckpt, params, "cpu")
    g = naive_gradients(model, [e.input_ids for e in enc], [e.labels for e in enc], tok.pad_token_id)
    feats = transform(g, "adam", adam).to(torch.float16)
    with open_store(ws / "out" / "grads", "synth_a", step, "adam") as r:
        for dim in (64, 128):
            proj = BasicProjector(grad_dim=g.shape[1], proj_dim=dim, seed=0, proj_type=ProjectionType.rademacher,
                                  device=torch.device("cpu"), block_size=128, dtype=torch.float32, model_id=0)
            expected = proj.project(feats, model_id=0).float()
            expected = (expected / expected.norm(dim=1, keepdim=True)).numpy()
            stored = r.read(dim)[:3].astype(np.float32)
            cos = (stored * expected).sum(1) / np.linalg.norm(stored, axis=1)
            assert cos.min() > 0.9999, cos
            np.testing.assert_allclose(stored, expected, atol=2e-3)
        assert r.projector["kind"] == "basic" and r.projector["seed"] == 0 and r.projector["block_size"] == 128
        assert r.attrs["grad_type"] == "adam" and r.attrs["step"] == step


def test_basic_projector_records_a_gpu_generator():
    """TRAK's BasicProjector draws its matrix on its device: a CUDA-made matrix differs, and its stores say so."""
    from lessctl.projection import make_projector, same_projection

    cpu = make_projector("basic", 1000, 64, "cpu")
    assert "generator" not in cpu.attrs  # as every store made before the key existed
    if torch.cuda.is_available():
        gpu = make_projector("basic", 1000, 64, "cuda")
        assert gpu.attrs["generator"] == "cuda" and same_projection(cpu.attrs, gpu.attrs) == ["generator: None vs 'cuda'"]
        x = torch.randn(3, 1000)
        assert not torch.allclose(cpu.project(x), gpu.project(x.cuda()).cpu(), atol=1e-2)


def test_cached_blocks_equal_trak_regeneration():
    """Our block cache (several blocks) gives exactly what TRAK's BasicProjector computes itself."""
    from trak.projectors import BasicProjector, ProjectionType

    from lessctl.projection import TrakBasicProjector

    x = torch.randn(5, 3000)
    ours = TrakBasicProjector(3000, 300, "cpu", block_size=128)
    assert ours.blocks is not None and len(ours.blocks) == 3
    theirs = BasicProjector(grad_dim=3000, proj_dim=300, seed=0, proj_type=ProjectionType.rademacher,
                            device=torch.device("cpu"), block_size=128, dtype=torch.float32)
    assert torch.equal(ours.project(x), theirs.project(x.half(), model_id=0).float())


def test_store_schema_and_verify(tiny_grads_ws, cli):
    res = cli("--config", tiny_grads_ws / "lessctl.toml", "store", "verify")
    assert res.code == 0, res
    res = cli("--config", tiny_grads_ws / "lessctl.toml", "store", "ls", "--json")
    stores = json.loads(res.out)["stores"]
    assert {(s["name"], s["grad_type"]) for s in stores} >= {("synth_a", "adam"), ("synth_b", "adam"),
                                                              ("arithmetic", "sgd"), ("antonyms", "sgd"), ("sorting", "sgd")}
    assert all(s["complete"] and s["dims"] == [64, 128] for s in stores)
    _, step = _checkpoint(tiny_grads_ws)
    p = store_path(tiny_grads_ws / "out" / "grads", "synth_a", step, "adam")
    with h5py.File(p) as f:
        n = f["index"].shape[0]
        assert f["dim128/features"].dtype == np.float16 and f["dim128/features"].shape == (n, 128)
        assert f["dim128/norms"].dtype == np.float32 and f["index"].dtype == np.int64
        assert len(f.attrs["source_sha256"]) == 64 and bool(f.attrs["complete"])
    size = p.stat().st_size
    assert size < (2 * n * (64 + 128) + 8 * n) * 1.5 + 64_000
    # a corrupted row makes verify fail with exit 1
    with h5py.File(p, "r+") as f:
        f["dim64/features"][0] = np.full(64, np.nan, dtype=np.float16)
    res = cli("--config", tiny_grads_ws / "lessctl.toml", "store", "verify")
    assert res.code == 1 and "error:" in res.err


def test_complete_store_is_skipped_unless_force(tiny_grads_ws, cli):
    cfgp = tiny_grads_ws / "lessctl.toml"
    res = cli("--config", cfgp, "grads", "--dims", "64", "128", "--target", "sorting", "--json")
    assert res.code == 0, res
    assert {s["status"] for s in json.loads(res.out)["stores"]} == {"skipped"}
    res = cli("--config", cfgp, "grads", "--dims", "64", "128", "--target", "sorting", "--ckpt-index", "1", "--force", "--json")
    assert res.code == 0, res
    assert [s["status"] for s in json.loads(res.out)["stores"]] == ["written"]


def _wait_rows(part: Path, at_least: int, proc, timeout: float = 120.0) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"grads finished before it could be killed: {proc.stderr.read()}")
        if part.exists():
            try:
                with h5py.File(part, "r", locking=False) as f:
                    n = int(f.attrs.get("rows_completed", 0))
                if n >= at_least:
                    return n
            except OSError:
                pass
        time.sleep(0.05)
    raise AssertionError("no progress in time")


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tiny_ws, tmp_path, cli):
    other = tmp_path / "uninterrupted"
    shutil.copytree(tiny_ws, other, symlinks=True)
    _, step = _checkpoint(tiny_ws)
    args = ["grads", "--ckpt", str(step), "--train", "synth_a", "--dims", "64", "--batch-tokens", "256"]
    env = {**os.environ, "LESSCTL_FLUSH_ROWS": "8"}
    proc = subprocess.Popen([sys.executable, "-m", "lessctl.cli", "--config", str(tiny_ws / "lessctl.toml"), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    final = store_path(tiny_ws / "out" / "grads", "synth_a", step, "adam")
    part = final.with_name(final.name + ".part")
    done = _wait_rows(part, 16, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not final.exists() and part.exists()
    assert 16 <= done < 180
    # resume (same flush size, in-process) and compare with an uninterrupted run
    os.environ["LESSCTL_FLUSH_ROWS"] = "8"
    try:
        import lessctl.collect as collect

        old, collect.FLUSH_ROWS = collect.FLUSH_ROWS, 8
        res = cli("--config", tiny_ws / "lessctl.toml", *args, "--json")
        assert res.code == 0, res
        assert json.loads(res.out)["stores"][0]["status"] == "resumed"
        res = cli("--config", other / "lessctl.toml", *args, "--json")
        assert res.code == 0, res
    finally:
        collect.FLUSH_ROWS = old
        os.environ.pop("LESSCTL_FLUSH_ROWS", None)
    with open_store(tiny_ws / "out" / "grads", "synth_a", step, "adam") as a, \
         open_store(other / "out" / "grads", "synth_a", step, "adam") as b:
        np.testing.assert_array_equal(a.index, b.index)
        np.testing.assert_array_equal(a.read(64), b.read(64))
        np.testing.assert_array_equal(a.norms(64), b.norms(64))


def test_three_shards_read_as_one(tiny_grads_ws, cli):
    cfgp = tiny_grads_ws / "lessctl.toml"
    _, step = _checkpoint(tiny_grads_ws)
    for k in (1, 2, 3):
        res = cli("--config", cfgp, "grads", "--ckpt", str(step), "--train", "synth_b", "--dims", "64", "128",
                  "--shard", f"{k}/3", "--device", "cpu", "--json")  # as the template's stores were made
        assert res.code == 0, res
    grads = tiny_grads_ws / "out" / "grads"
    whole = store_path(grads, "synth_b", step, "adam")
    moved = whole.with_name("whole.h5")
    whole.rename(moved)
    from lessctl.store import StoreReader

    with open_store(grads, "synth_b", step, "adam") as sharded, StoreReader([moved]) as ref:
        assert len(sharded.paths) == 3 and sharded.n_rows == ref.n_rows
        np.testing.assert_array_equal(sharded.index, ref.index)
        for d in (64, 128):
            np.testing.assert_allclose(sharded.read(d).astype(np.float32), ref.read(d).astype(np.float32), atol=2e-3)
    # a missing shard is named
    store_path(grads, "synth_b", step, "adam", (2, 3)).unlink()
    res = cli("--config", cfgp, "match", "--target", "sorting", "--ckpts", str(step))
    assert res.code == 2 and "shard 2/3" in res.err and "--shard 2/3" in res.err


def test_changed_source_refuses_to_resume(tiny_ws, cli):
    cfgp = tiny_ws / "lessctl.toml"
    _, step = _checkpoint(tiny_ws)
    # make a partial store by killing a subprocess early
    proc = subprocess.Popen([sys.executable, "-m", "lessctl.cli", "--config", str(cfgp), "grads", "--ckpt", str(step),
                             "--train", "synth_a", "--dims", "64", "--batch-tokens", "256"],
                            env={**os.environ, "LESSCTL_FLUSH_ROWS": "8"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    final = store_path(tiny_ws / "out" / "grads", "synth_a", step, "adam")
    _wait_rows(final.with_name(final.name + ".part"), 8, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(tiny_ws / "data" / "synth_a.jsonl", "a") as fh:
        fh.write(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    res = cli("--config", cfgp, "grads", "--ckpt", str(step), "--train", "synth_a", "--dims", "64")
    assert res.code == 2 and res.err.count("error:") == 1 and "source" in res.err and "--force" in res.err, res


@pytest.mark.parametrize(
    "args, needle",
    [
        (["grads", "--type", "adamw"], "--type"),
        (["grads", "--shard", "4/3"], "--shard"),
        (["grads", "--shard", "x"], "--shard"),
        (["grads", "--ckpt", "99999"], "--ckpt"),
        (["grads", "--train", "nope"], "--train"),
        (["grads", "--target", "nope"], "--target"),
        (["grads", "--projector", "magic"], "projector"),
        (["grads", "--ckpt-index", "9"], "--ckpt-index"),
    ],
)
def test_grads_user_errors(tiny_ws, cli, args, needle):
    res = cli("--config", tiny_ws / "lessctl.toml", *args)
    assert res.code == 2, res
    lines = [l for l in res.err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res
    assert "Traceback" not in res.err


def test_adam_without_optimizer_state_is_a_user_error(tiny_ws, cli):
    ckpt, step = _checkpoint(tiny_ws)
    (ckpt / "optimizer.pt").unlink()
    res = cli("--config", tiny_ws / "lessctl.toml", "grads", "--ckpt", str(step), "--train", "synth_a", "--dims", "64")
    assert res.code == 2 and "optimizer.pt" in res.err and "--type sgd" in res.err, res
    # sgd works without it
    res = cli("--config", tiny_ws / "lessctl.toml", "grads", "--ckpt", str(step), "--target", "sorting", "--dims", "64")
    assert res.code == 0, res


def test_grads_without_warmup_names_the_command(tmp_path, cli):
    from lessctl.workspace import preset_config
    from lessctl.config import to_toml

    (tmp_path / "lessctl.toml").write_text(to_toml(preset_config("tiny")))
    res = cli("--config", tmp_path / "lessctl.toml", "grads")
    assert res.code == 2 and "lessctl warmup" in res.err
    assert load_config(tmp_path / "lessctl.toml").grads.dims == [128]


def test_feature_collector_equals_per_batch_projection(tiny_template):
    """Gathering rows across batches for larger projector calls changes nothing in the features."""
    from lessctl.gradients import FeatureCollector
    from lessctl.projection import TrakBasicProjector

    model, tok = _model(tiny_template)
    ckpt, _ = _checkpoint(tiny_template)
    enc = _encoded(tiny_template, tok, 14)
    seqs, labels = [e.input_ids for e in enc], [e.labels for e in enc]
    peg = PerExampleGradients(model)
    adam = load_adam_state(ckpt, peg.params, "cpu")
    proj = {64: TrakBasicProjector(peg.grad_dim, 64, "cpu")}
    try:
        small = FeatureCollector(peg, proj, "adam", adam, pad_id=tok.pad_token_id, batch_tokens=120, project_rows=1)(seqs, labels)
        big = FeatureCollector(peg, proj, "adam", adam, pad_id=tok.pad_token_id, batch_tokens=120, project_rows=1000,
                               max_batch_examples=3)(seqs, labels)
        naive = naive_gradients(model, seqs, labels, tok.pad_token_id)
    finally:
        peg.remove()
    assert len(small.batches) > 1 and all(b <= 3 for b, _ in big.batches)
    np.testing.assert_allclose(small.features[64], big.features[64], rtol=1e-4, atol=1e-4)
    expected = proj[64].project(transform(naive, "adam", adam)).numpy()
    np.testing.assert_allclose(big.features[64], expected, rtol=1e-3, atol=1e-3)


def test_count_sketch_equals_its_dense_matrix_and_is_deterministic(monkeypatch):
    from lessctl import sketch
    from lessctl.projection import make_projector

    monkeypatch.setattr(sketch, "GROUP_COORDINATES", 700)  # several generator groups (of 10 chunks)
    p = make_projector("sketch", 2000, 64, "cpu", seed=5)
    assert p.seg.shape == (32, 1) and p.code.shape == (32, 1, 64)  # chunks of 64, one segment of 64 each
    assert p.attrs["kind"] == "sketch" and p.attrs["seed"] == 5 and p.attrs["hash"] == "segment-permutation"
    dense = sketch.dense_matrix(p.seg, p.code, 2000, 64)
    assert (dense.abs().sum(1) == 1).all()  # one +-1 per parameter
    assert (dense[:1984].view(31, 64, 64).abs().sum(1) == 1).all()  # a full chunk fills every output once
    x = torch.randn(6, 2000)
    torch.testing.assert_close(p.project(x), x @ dense, rtol=1e-5, atol=1e-5)
    again = make_projector("sketch", 2000, 64, "cpu", seed=5)
    assert torch.equal(p.project(x), again.project(x))
    other = make_projector("sketch", 2000, 64, "cpu", seed=6)
    assert not torch.equal(p.project(x), other.project(x))


def test_sketch_stores_are_recorded_and_not_matched_with_rademacher(tiny_grads_ws, cli):
    ws = tiny_grads_ws
    step = json.loads((ws / "out" / "warmup" / "checkpoints.json").read_text())[0]["step"]
    res = cli("--config", ws / "lessctl.toml", "grads", "--ckpt", str(step), "--target", "sorting", "--dims", "64", "128",
              "--projector", "sketch", "--force")
    assert res.code == 0, res
    assert "projector: sketch" in res.out + res.err
    assert "TRAK's CUDA projection" not in res.out + res.err  # the engine line is the CUDA projector's only
    with open_store(ws / "out" / "grads", "sorting", step, "sgd") as r:
        assert r.projector["kind"] == "sketch"
    res = cli("--config", ws / "lessctl.toml", "match", "--target", "sorting")
    assert res.code == 2 and "projected differently" in res.err


def test_lora_engine_generic_engine_and_merged_pass_agree_with_batch_of_one(tiny_template):
    """The three ways of hooking a model give the naive per-example gradients; merging restores the weights bit for bit."""
    model, tok = _model(tiny_template)
    enc = _encoded(tiny_template, tok, 9)
    seqs, labels = [e.input_ids for e in enc], [e.labels for e in enc]
    naive = naive_gradients(model, seqs, labels, tok.pad_token_id)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    peg = PerExampleGradients(model)
    assert peg.lora is not None and len(peg.lora) == 4 * model.config.num_hidden_layers
    try:
        lora_rows, _, _ = peg(seqs, labels, tok.pad_token_id)
    finally:
        peg.remove()
    merged = PerExampleGradients(model, merge=True)
    try:
        changed = [n for n, p in model.named_parameters() if "base_layer" in n and not torch.equal(p, before[n])]
        assert len(changed) == 4 * model.config.num_hidden_layers  # the delta went into every LoRA'd base weight
        merged_rows, _, _ = merged(seqs, labels, tok.pad_token_id)
    finally:
        merged.remove()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    for rows in (lora_rows, merged_rows):
        rel = (rows - naive).norm(dim=1) / naive.norm(dim=1)
        assert rel.max().item() < 1e-4, rel
    # after remove() the model computes what it computed before (the LoRA branch is back)
    assert torch.allclose(naive_gradients(model, seqs[:2], labels[:2], tok.pad_token_id), naive[:2], atol=1e-7)

    # a model that is not a peft LoRA model: hooks on its trainable Linear weights
    base = model.get_base_model()
    for n, p in base.named_parameters():
        p.requires_grad_(n.endswith("mlp.down_proj.weight"))
    generic = PerExampleGradients(base)
    try:
        assert generic.lora is None
        rows, _, _ = generic(seqs, labels, tok.pad_token_id)
    finally:
        generic.remove()
    ref = naive_gradients(base, seqs, labels, tok.pad_token_id)
    assert rows.shape == ref.shape and ((rows - ref).norm(dim=1) / ref.norm(dim=1)).max().item() < 1e-4


def test_loss_on_label_positions_only_equals_the_full_logits_loss(tiny_template):
    """A Llama's head runs on the label positions only; the losses, counts and gradients are those of the full
    logits (the path every model outside PLAIN_HEADS takes), a fully masked example included."""
    model, tok = _model(tiny_template)
    enc = _encoded(tiny_template, tok, 6)
    seqs, labels = [e.input_ids for e in enc], [list(e.labels) for e in enc]
    labels[2] = [-100] * len(labels[2])
    peg = PerExampleGradients(model)
    try:
        assert peg._head is not None and peg._head[1] is model.get_output_embeddings()
        rows, loss, count = peg(seqs, labels, tok.pad_token_id)
        peg._head = None
        ref_rows, ref_loss, ref_count = peg(seqs, labels, tok.pad_token_id)
    finally:
        peg.remove()
    assert torch.equal(count, ref_count) and count[2] == 0 and loss[2] == 0
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert torch.allclose(rows, ref_rows, rtol=1e-4, atol=1e-6 * ref_rows.abs().max().item())
    assert not rows[2].any()


def test_features_are_the_transform_of_the_gradients_in_float16(tiny_template):
    model, tok = _model(tiny_template)
    ckpt, _ = _checkpoint(tiny_template)
    enc = _encoded(tiny_template, tok, 6)
    seqs, labels = [e.input_ids for e in enc], [e.labels for e in enc]
    peg = PerExampleGradients(model)
    adam = load_adam_state(ckpt, peg.params, "cpu")
    try:
        raw, _, _ = peg(seqs, labels, tok.pad_token_id)
        for kind in ("adam", "sgd", "sign"):
            f16, r16, _, _ = peg.features(seqs, labels, tok.pad_token_id, kind, adam if kind == "adam" else None,
                                          keep_raw=True)
            assert f16.dtype == r16.dtype == torch.float16
            expected = transform(raw.clone(), kind, adam).to(torch.float16)
            assert torch.allclose(f16.float(), expected.float(), rtol=2e-3, atol=1e-5), kind
            assert torch.allclose(r16.float(), raw.to(torch.float16).float(), rtol=2e-3, atol=1e-7)
    finally:
        peg.remove()
    with pytest.raises(Exception, match="not \\(only\\) peft LoRA"):
        base = model.get_base_model()
        for n, p in base.named_parameters():
            p.requires_grad_(n.endswith("down_proj.weight"))
        PerExampleGradients(base, merge=True)


def test_fast_jl_chunks_follow_its_tiles():
    from lessctl.projection import fast_jl_chunks

    assert fast_jl_chunks(2**27, 132, 16) == [(0, 2**27, 0, 132)]  # 16 x 2**27 fits the 32-bit indexing
    for grad_dim, tiles in ((2**27, 132), (2**27, 108), (3 * 2**27, 132), (2**27 + 12345, 114)):
        chunks = fast_jl_chunks(grad_dim, tiles, 32)
        assert chunks is not None and len(chunks) > 1
        tile = -(-grad_dim // tiles)
        assert chunks[0][0] == 0 and chunks[-1][1] == grad_dim and sum(m for *_, m in chunks) == tiles
        for (start, stop, t0, m), nxt in zip(chunks, chunks[1:] + [None]):
            assert start == t0 * tile and 32 * (stop - start) < 2**32
            assert -(-(stop - start) // m) == tile  # fast_jl will cut this chunk into m tiles of the same width
            if nxt:
                assert nxt[0] == stop and nxt[2] == t0 + m
    assert fast_jl_chunks(2**33, 132, 32) is None  # one tile alone is too wide for 32 rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with fast_jl")
def test_chunked_fast_jl_equals_trak_cuda_projector():
    """32 rows of 2**27 features: lessctl's chunked calls give TRAK's CudaProjector result (batches of 16)."""
    from trak.projectors import CudaProjector, ProjectionType

    from lessctl.projection import TrakCudaProjector

    P, D = 2**27, 1024
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(32, P, device="cuda", generator=gen) * 1e-3).half()
    ours = TrakCudaProjector(P, D, "cuda", engine="fast_jl")  # the chunked fast_jl path itself
    assert ours.max_rows == 32 and len(ours.chunks) > 1
    got = ours.project(x)
    trak = CudaProjector(grad_dim=P, proj_dim=D, seed=0, proj_type=ProjectionType.rademacher, device="cuda",
                         max_batch_size=16)
    ref = torch.cat([trak.project(x[i : i + 16], model_id=0) for i in (0, 16)])
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_transform_into_equals_transform():
    from lessctl.gradients import transform_into

    gen = torch.Generator().manual_seed(0)
    P = 300
    adam = AdamState(torch.randn(P, generator=gen) * 1e-4, torch.rand(P, generator=gen) * 1e-6, 0.9, 0.999, 1e-8)
    g = torch.randn(5, 120, generator=gen) * 1e-3
    for kind in ("adam", "sgd", "sign"):
        out = torch.zeros(5, P, dtype=torch.float16)
        transform_into(g.clone(), kind, adam if kind == "adam" else None, 100, out[:, 100:220])
        full = torch.zeros(5, P)
        full[:, 100:220] = g
        expected = transform(full, kind, adam)[:, 100:220].to(torch.float16)
        assert torch.equal(out[:, :100], torch.zeros(5, 100, dtype=torch.float16))
        assert torch.allclose(out[:, 100:220].float(), expected.float(), rtol=1e-3, atol=1e-6), kind


def test_batches_avoid_padding_a_short_example_to_a_long_one():
    from lessctl.gradients import BATCH_OVERHEAD_TOKENS

    lengths = [1000, 60, 58, 57, 55, 50]
    batches = list(token_batches(lengths, 4096))
    assert batches[0] == [0]  # the long example alone: the others are not padded to 1000 tokens
    assert sorted(i for b in batches for i in b) == list(range(len(lengths))) and len(batches) == 2
    # with a cap, the batches respect it and still cover everything once
    capped = list(token_batches(lengths, 4096, 2))
    assert all(len(b) <= 2 for b in capped) and sorted(i for b in capped for i in b) == list(range(6))
    assert BATCH_OVERHEAD_TOKENS > 0


def test_merged_and_unmerged_passes_write_the_same_stores(tiny_grads_ws, cli):
    """`lessctl grads` merges the adapter by default; --no-merge runs peft's LoRA branch: same features."""
    ws = tiny_grads_ws
    grads = ws / "out" / "grads"
    _, step = _checkpoint(ws)
    with open_store(grads, "synth_a", step, "adam") as r:
        merged_train = r.read(64)
    with open_store(grads, "sorting", step, "sgd") as r:
        merged_target = r.read(64)
    res = cli("--config", ws / "lessctl.toml", "grads", "--no-merge", "--force", "--ckpt", str(step), "--dims", "64",
              "--train", "synth_a", "--target", "sorting", "--projector", "basic", "--device", "cpu")
    assert res.code == 0, res.err
    with open_store(grads, "synth_a", step, "adam") as r:
        np.testing.assert_allclose(r.read(64), merged_train, rtol=1e-3, atol=1e-3)
    with open_store(grads, "sorting", step, "sgd") as r:
        np.testing.assert_allclose(r.read(64), merged_target, rtol=1e-3, atol=1e-3)


def test_devices_write_shards_equal_to_a_single_device_run(tiny_ws, tmp_path, cli):
    """`--devices cpu,cpu`: two spawned workers write shard 1/2 and 2/2 of every store; read as one, they are the
    stores of a single-device run, row for row."""
    single = tmp_path / "single"
    shutil.copytree(tiny_ws, single, symlinks=True)
    _, step = _checkpoint(tiny_ws)
    args = ["grads", "--ckpt", str(step), "--train", "synth_b", "--target", "sorting", "--dims", "64", "--projector", "basic"]
    res = cli("--config", tiny_ws / "lessctl.toml", *args, "--devices", "cpu,cpu", "--json")
    assert res.code == 0, res
    stores = json.loads(res.out)["stores"]
    assert [(s["name"], s["shard"], s["device"], s["status"]) for s in stores] == [
        ("synth_b", "1/2", "cpu", "written"), ("synth_b", "2/2", "cpu", "written"),
        ("sorting", "1/2", "cpu", "written"), ("sorting", "2/2", "cpu", "written")]
    res = cli("--config", single / "lessctl.toml", *args, "--device", "cpu", "--json")
    assert res.code == 0, res
    for name, kind in (("synth_b", "adam"), ("sorting", "sgd")):
        grads = tiny_ws / "out" / "grads"
        assert not store_path(grads, name, step, kind).exists()
        assert all(store_path(grads, name, step, kind, (k, 2)).exists() for k in (1, 2))
        with open_store(grads, name, step, kind) as sharded, open_store(single / "out" / "grads", name, step, kind) as ref:
            assert len(sharded.paths) == 2 and sharded.n_rows == ref.n_rows
            np.testing.assert_array_equal(sharded.index, ref.index)
            np.testing.assert_allclose(sharded.read(64).astype(np.float32), ref.read(64).astype(np.float32),
                                       rtol=0, atol=5e-4)
            np.testing.assert_allclose(sharded.norms(64), ref.norms(64), rtol=1e-3)
    # a second run finds every shard complete
    res = cli("--config", tiny_ws / "lessctl.toml", *args, "--devices", "cpu,cpu", "--json")
    assert res.code == 0 and {s["status"] for s in json.loads(res.out)["stores"]} == {"skipped"}, res


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--devices", "2"], "--devices"),
        (["--devices", "cpu,cpu", "--shard", "1/2"], "--shard"),
        (["--devices", "cpu,cpu", "--device", "cpu"], "--device"),
        (["--devices", "cpu,gpu"], "--devices"),
    ],
)
def test_devices_user_errors(tiny_ws, cli, args, needle):
    if args[1] == "2" and torch.cuda.device_count() >= 2:
        pytest.skip("two CUDA GPUs are visible")
    res = cli("--config", tiny_ws / "lessctl.toml", "grads", *args)
    assert res.code == 2, res
    lines = [l for l in res.err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0] and "--devices" in lines[0], res


def test_devices_worker_error_is_raised_by_the_parent(tiny_ws, cli):
    """A lessctl error in a worker (here: adam features without optimizer.pt) ends the run with that error."""
    ckpt, step = _checkpoint(tiny_ws)
    (ckpt / "optimizer.pt").unlink()
    res = cli("--config", tiny_ws / "lessctl.toml", "grads", "--ckpt", str(step), "--train", "synth_a", "--dims", "64",
              "--devices", "cpu,cpu")
    assert res.code == 2 and res.err.count("error:") == 1 and "optimizer.pt" in res.err, res
    assert "Traceback" not in res.err


def test_devices_progress_sums_the_workers_rows_per_store():
    from lessctl.multidevice import _ProgressSum

    seen = []
    p = _ProgressSum(lambda *a: seen.append(a))
    p.update(1, "a", 5, 0, 45)
    p.update(2, "a", 5, 0, 45)
    p.update(1, "a", 5, 45, 45)
    p.update(1, "b", 5, 0, 10)  # worker 1 is on the next store while worker 2 still works on the first
    p.update(2, "a", 5, 40, 45)
    p.update(2, "a", 5, 45, 45)
    p.update(2, "b", 5, 10, 10)
    assert seen == [("a", 5, 0, 45), ("a", 5, 0, 90), ("a", 5, 45, 90), ("a", 5, 45, 90), ("a", 5, 85, 90),
                    ("b", 5, 0, 10), ("b", 5, 10, 20)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fast_paths_equal_the_torch_ops():
    """The Triton Adam kernel and the bf16 x bf16 -> f32 bmm give what the plain torch ops give."""
    from lessctl import kernels
    from lessctl.gradients import transform_into

    gen = torch.Generator(device="cuda").manual_seed(0)
    P, n, off = 5000, 3000, 1500
    adam = AdamState(torch.randn(P, device="cuda", generator=gen) * 1e-4,
                     torch.rand(P, device="cuda", generator=gen) * 1e-6, 0.9, 0.999, 1e-8)
    g = torch.randn(6, n, device="cuda", generator=gen) * 1e-3
    fused = torch.zeros(6, P, dtype=torch.float16, device="cuda")
    transform_into(g.clone(), "adam", adam, off, fused[:, off : off + n])
    assert kernels.fast_paths()["triton"] is True
    full = torch.zeros(6, P, device="cuda")
    full[:, off : off + n] = g
    ref = transform(full, "adam", adam)[:, off : off + n].half()
    assert torch.allclose(fused[:, off : off + n].float(), ref.float(), rtol=1e-3, atol=1e-5)
    assert not fused[:, :off].any() and not fused[:, off + n :].any()

    a = torch.randn(3, 40, 70, device="cuda", generator=gen).bfloat16()
    b = torch.randn(3, 70, 50, device="cuda", generator=gen).bfloat16()
    if kernels.has_bmm_f32("cuda"):  # this torch supports out_dtype
        got = kernels.bmm_f32(a, b)
        assert got.dtype == torch.float32
        assert torch.allclose(got, torch.bmm(a.float(), b.float()), rtol=1e-4, atol=1e-4)


def test_compiled_pass_gives_the_same_gradients(tiny_template):
    """`grads --compile`: the compiled pass (zero probes on the LoRA outputs, no attention mask) gives the eager
    pass's per-example gradients, for batches of several shapes, merged and not; the eager hooks are gone."""
    model, tok = _model(tiny_template)
    enc = _encoded(tiny_template, tok, 5)
    seqs, labels = [e.input_ids for e in enc], [e.labels for e in enc]
    from torch._dynamo.utils import counters

    counters.clear()
    for merge in (True, False):
        peg = PerExampleGradients(model, merge=merge)
        try:
            ref, ref_loss, _ = peg(seqs, labels, tok.pad_token_id)
            peg.compile()
            assert len(peg._handles) == len(peg.targets)  # probe hooks only
            got, loss, _ = peg(seqs, labels, tok.pad_token_id)
            graphs = counters["stats"]["unique_graphs"]
            got2, _, _ = peg(seqs[:2], labels[:2], tok.pad_token_id)  # another shape: dynamic, no failure
            got1, loss1, _ = peg(seqs[4:], labels[4:], tok.pad_token_id)  # one example: a row without labels is added
            assert counters["stats"]["unique_graphs"] == graphs, "every batch shape must reuse the compiled graphs"
            assert not counters["graph_break"], counters["graph_break"]
        finally:
            peg.remove()
        tol = dict(rtol=1e-4, atol=1e-6 * ref.abs().max().item())
        assert torch.allclose(got, ref, **tol)
        assert torch.allclose(got2, ref[:2], **tol)
        assert got1.shape == (1, peg.grad_dim) and loss1.shape == (1,)
        assert torch.allclose(got1, ref[4:], **tol)
        assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert not any(m._forward_hooks or m._compiled_call_impl for m in model.modules())
    assert not any(hasattr(m, "_lessctl_probe") for m in model.modules())


def test_windows_hold_whole_projection_calls():
    from lessctl.collect import window_rows

    assert window_rows(256, 63) == 315 and window_rows(256, 64) == 256 and window_rows(256, 100) == 300
    assert window_rows(256, 4096) == 256 and window_rows(4, 4) == 4
