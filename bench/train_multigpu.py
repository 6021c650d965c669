"""Packed LoRA warmup on several processes (torchrun, DDP) against one process: the same training, and its speed.

One synthetic workspace (a random-weight Llama at `--shape`, a BPE tokenizer trained on the data, a training file
of made-up chat examples with LESS's length distribution; nothing downloaded) is warmed up by lessctl's own
`run_warmup` (what `lessctl warmup` calls) with packing on and `effective_batch_size` set:

- **1 process**: one GPU (CUDA_VISIBLE_DEVICES=0), or one CPU process;
- **N processes**: `python -m torch.distributed.run --standalone --nproc-per-node N` on N GPUs (NCCL), or N CPU
  processes (gloo) with `--device cpu`;
- optionally (`--repeat-single`) the 1-process run again: the run-to-run noise floor of the same arithmetic;
- optionally (`--cli-check`) the real CLI, `lessctl warmup`, under torchrun on N processes.

LoRA dropout is 0, so the runs differ only in where the step's examples are computed. Checked: each optimizer
step takes the same examples (each process's `PackingCollator` input is recorded; the union over processes of
step k must be the 1-process step k), the logged losses and gradient norms of every step, the checkpoint
manifest (steps, lr_mean), the adapters of every checkpoint (relative difference; lora_B starts at zero, so it is
all learned). Timed: examples/s over the steps after the first, leaving out each step that follows a checkpoint
save (the save's time falls into that interval).

    python bench/train_multigpu.py --device cpu --nproc 2 --shape tiny          # smoke test, a minute or two
    python bench/train_multigpu.py --device cuda --nproc 2 --shape 1b --repeat-single --out train_multigpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from grads_throughput import SHAPES  # noqa: E402

# NVLink multicast stays off on shared hosts (the device machines' rule); torchrun's workers inherit these
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def log(msg: str) -> None:
    print(f"[train-multigpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the workspace


def word_list(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(r.choice(letters) for _ in range(r.randint(2, 7))))
    return sorted(words)


def example_lengths(n: int, seed: int, mean: float, lo: int, hi: int, sigma: float = 0.8) -> list[int]:
    """Lognormal lengths clipped to [lo, hi] whose mean is `mean` for this very sample (bisection on the location)."""
    r = random.Random(seed)
    z = [r.gauss(0.0, 1.0) for _ in range(n)]

    def lengths(mu: float) -> list[int]:
        return [min(hi, max(lo, round(math.exp(mu + sigma * x)))) for x in z]

    a, b = math.log(lo) - 5 * sigma, math.log(hi) + 5 * sigma
    for _ in range(60):
        mid = (a + b) / 2
        a, b = (mid, b) if sum(lengths(mid)) / n < mean else (a, mid)
    return lengths((a + b) / 2)


def write_data(path: Path, n: int, args) -> list[dict]:
    """n chat examples of random words: the user's share `--prompt-share` of each example's words, the rest
    the assistant's (trained on). Word counts follow LESS's token lengths (about one token a word here)."""
    words = word_list(args.words, args.seed)
    r = random.Random(args.seed + 1)
    recs = []
    for i, L in enumerate(example_lengths(n, args.seed, args.mean_words, args.min_words, args.max_words)):
        k = max(1, int(L * args.prompt_share))
        user = " ".join(r.choice(words) for _ in range(k))
        answer = " ".join(r.choice(words) for _ in range(max(1, L - k)))
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        recs.append({"dataset": "synth", "id": f"synth_{i}", "messages": msgs})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in recs), encoding="utf-8")
    return recs


def build_model_folder(out: Path, recs: list[dict], args, device: str) -> dict:
    """The tokenizer (lessctl.tiny's byte-level BPE, trained on the data) and a random-weight Llama of `--shape`
    saved beside it; the model's vocabulary is the shape's (the output layer costs what a real one costs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lessctl.tiny import train_tokenizer

    texts = [f"<|{m['role']}|>\n{m['content']}\n" for x in recs for m in x["messages"]]
    tok = train_tokenizer(texts, out, vocab_size=args.tokenizer_vocab, max_length=args.max_positions)
    shape = dict(SHAPES[args.shape])
    shape["vocab_size"] = max(shape["vocab_size"], len(tok))
    cfg = LlamaConfig(
        **shape,
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(args.seed)
    with torch.device("cuda" if device.startswith("cuda") else "cpu"):
        model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16 if args.save_bf16 else torch.float32).save_pretrained(str(out))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"parameters": n_params, "tokenizer_vocab": len(tok), **shape}


def write_workspace(folder: Path, model_dir: Path, data: Path, args) -> Path:
    from lessctl.config import CONFIG_NAME, build_config, to_toml

    raw = {
        "model": {"name_or_path": str(model_dir), "dtype": "auto", "max_seq_length": args.max_seq_length},
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0},
        "data": {"train": {"synth": str(data)}},
        "warmup": {
            "percentage": 1.0,
            "epochs": args.epochs,
            "batch_size": 1,
            "effective_batch_size": args.examples_per_step,
            "packing": True,
            "pack_tokens": args.pack_tokens,
            "learning_rate": args.learning_rate,
            "logging_steps": 1,
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_NAME
    path.write_text(to_toml(raw))
    build_config(raw, path=path)  # fails here, not in the workers, on a bad key
    return path


# --------------------------------------------------------------------------- one training process


def example_hash(ids) -> str:
    return hashlib.blake2b(bytes(json.dumps(list(ids)), "ascii"), digest_size=8).hexdigest()


def worker(args) -> None:
    """One process of a run: `run_warmup` on the workspace, instrumented (what each collator call got, when
    each step was logged, where the base model was loaded, peak memory); writes worker-rank<r>.json."""
    import torch

    import lessctl.models
    from lessctl.config import load_config
    from lessctl.training import run_warmup
    from lessctl.training.trainers import PackingCollator

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = args.device.startswith("cuda")
    if cuda and args.set_device:
        torch.cuda.set_device(local)  # the workaround: "cuda" then means this process's GPU
    batches: list[dict] = []
    collate = PackingCollator.__call__

    def recording_call(self, features):
        batches.append(
            {
                "n_examples": len(features),
                "tokens": sum(len(f["input_ids"]) for f in features),
                "hashes": sorted(example_hash(f["input_ids"]) for f in features),
            }
        )
        out = collate(self, features)
        batches[-1]["packs"] = len(out["packs"])
        return out

    PackingCollator.__call__ = recording_call
    loaded_on: list[str] = []
    load = lessctl.models.load_base_model

    def recording_load(*a, **kw):
        model = load(*a, **kw)
        loaded_on.append(str(next(model.parameters()).device))
        return model

    lessctl.models.load_base_model = recording_load

    stamps: dict[int, float] = {}

    def on_log(rec: dict) -> None:
        if "loss" in rec:
            stamps[int(rec["step"])] = time.perf_counter()

    cfg = load_config(Path(args.config))
    t0 = time.perf_counter()
    res = run_warmup(cfg, device=args.device, on_log=on_log)
    wall = time.perf_counter() - t0
    report = {
        "rank": rank,
        "world_size": world,
        "local_rank": local,
        "set_device": bool(args.set_device),
        "loaded_on": loaded_on,
        "seconds": res.seconds,
        "wall_s": wall,
        "plan": res.plan,
        "counts": res.counts,
        "checkpoints": res.checkpoints,
        "stamps": {str(k): v for k, v in sorted(stamps.items())},
        "batches": batches,
    }
    if cuda:
        report["peak_memory_gib"] = {
            f"cuda:{d}": torch.cuda.max_memory_allocated(d) / 2**30 for d in range(torch.cuda.device_count())
        }
        report["device_name"] = torch.cuda.get_device_name(local)
    out = Path(args.config).parent / f"worker-rank{rank}.json"
    out.write_text(json.dumps(report))


# --------------------------------------------------------------------------- runs and their comparison


def launch(args, config: Path, nproc: int, *, cli: bool = False, set_device: bool = False) -> dict:
    env = {**os.environ, **SAFE_ENV, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # no install needed
    if args.device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(nproc))
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if cli:
        target = ["-m", "lessctl.cli", "--config", str(config), "warmup", "--device", args.device, "--json"]
    else:
        target = [str(Path(__file__).resolve()), "--worker", "--config", str(config), "--device", args.device]
        target += ["--set-device"] if set_device else []
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
        cmd += [f"--nproc-per-node={nproc}", *target]
    else:
        cmd = [sys.executable, *target]
    log(f"{'cli' if cli else 'library'} run on {nproc} process(es): {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.run_timeout)
    wall = time.perf_counter() - t0
    res = {"processes": nproc, "cli": cli, "set_device": set_device, "returncode": proc.returncode, "wall_s": wall}
    if proc.returncode != 0:
        res["stderr_tail"] = proc.stderr[-4000:]
        log(f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    if cli:
        try:
            json.loads(proc.stdout)
            res["stdout_is_one_json_document"] = True
        except ValueError:  # e.g. one document from each process
            res["stdout_is_one_json_document"] = False
            res["stdout_json_documents"] = proc.stdout.count('"output_dir"')
    return res


def read_run(config: Path, nproc: int, launched: dict) -> dict:
    """What a finished run left: the workers' records, the logged steps, the manifest, the checkpoints."""
    ws = config.parent
    out = ws / "out" / "warmup"
    workers = []
    for r in range(nproc):
        p = ws / f"worker-rank{r}.json"
        workers.append(json.loads(p.read_text()) if p.is_file() else None)
    ckpts = sorted((d for d in out.glob("checkpoint-*") if d.is_dir()), key=lambda d: int(d.name.split("-")[1]))
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text()) if ckpts else {"log_history": []}
    steps = [h for h in state["log_history"] if "loss" in h]
    lines = (out / "log_history.jsonl").read_text().splitlines() if (out / "log_history.jsonl").is_file() else []
    logged = [json.loads(x) for x in lines]
    manifest = json.loads((out / "checkpoints.json").read_text()) if (out / "checkpoints.json").is_file() else None
    return {
        **launched,
        "out": out,
        "workers": workers,
        "losses": [h["loss"] for h in steps],
        "grad_norms": [h.get("grad_norm") for h in steps],
        "lrs": [h.get("learning_rate") for h in steps],
        "log_history_jsonl_loss_lines": sum(1 for x in logged if "loss" in x),
        "manifest": manifest,
        "checkpoint_dirs": [d.name for d in ckpts],
    }


def step_batches(run: dict) -> list[dict]:
    """Per optimizer step: the examples (hashes) over all processes and each process's count."""
    per_rank = [w["batches"] if w else [] for w in run["workers"]]
    n = max((len(b) for b in per_rank), default=0)
    steps = []
    for k in range(n):
        got = [b[k] for b in per_rank if k < len(b)]
        steps.append(
            {
                "hashes": sorted(h for g in got for h in g["hashes"]),
                "per_device": [g["n_examples"] for g in got],
                "packs": [g["packs"] for g in got],
                "tokens": sum(g["tokens"] for g in got),
            }
        )
    return steps


def throughput(run: dict, examples_per_step: int) -> dict:
    w0 = run["workers"][0]
    stamps = {int(k): v for k, v in w0["stamps"].items()}
    saved = {c["step"] for c in (run["manifest"] or [])}
    steps = sorted(stamps)
    timed = [s for s in steps[1:] if s - 1 in stamps and (s - 1) not in saved]
    seconds = sum(stamps[s] - stamps[s - 1] for s in timed)
    batches = step_batches(run)
    tokens = sum(batches[s - 1]["tokens"] for s in timed if s - 1 < len(batches))
    return {
        "timed_steps": len(timed),
        "timed_seconds": seconds,
        "examples_per_s": len(timed) * examples_per_step / seconds if seconds else None,
        "tokens_per_s": tokens / seconds if seconds else None,
        "train_lora_seconds_rank0": w0["seconds"],
        "process_wall_s": run["wall_s"],
    }


def adapter_diff(a_dir: Path, b_dir: Path) -> dict:
    """Relative differences of two adapters: over all tensors, over lora_B alone (zero at init: all of it
    learned), and the largest per-tensor one."""
    from safetensors.torch import load_file

    a = load_file(str(a_dir / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter_model.safetensors"))
    if set(a) != set(b):
        return {"same_keys": False}
    sums = {"all": [0.0, 0.0], "lora_B": [0.0, 0.0], "lora_A": [0.0, 0.0]}
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        d, n = (x - y).norm().item() ** 2, x.norm().item() ** 2
        for part in ("all", "lora_B" if "lora_B" in k else "lora_A"):
            sums[part][0] += d
            sums[part][1] += n
        worst = max(worst, math.sqrt(d / n) if n else math.sqrt(d))
    out = {f"rel_diff_{p}": math.sqrt(d / n) if n else None for p, (d, n) in sums.items()}
    out["lora_B_norm"] = math.sqrt(sums["lora_B"][1])
    out["max_tensor_rel_diff"] = worst
    out["same_keys"] = True
    return out


def compare(ref: dict, other: dict) -> dict:
    """Step by step: the same examples, losses, gradient norms, learning rates; the manifest; the adapters."""
    rb, ob = step_batches(ref), step_batches(other)
    same_examples = len(rb) == len(ob) and all(x["hashes"] == y["hashes"] for x, y in zip(rb, ob))
    if not rb or not ob:
        same_examples = None  # a run without the recording worker (the CLI)
    pairs = list(zip(ref["losses"], other["losses"]))
    gpairs = [(a, b) for a, b in zip(ref["grad_norms"], other["grad_norms"]) if a is not None and b is not None]
    res = {
        "steps": [len(ref["losses"]), len(other["losses"])],
        "same_examples_every_step": same_examples,
        "examples_per_step": sorted({sum(x["per_device"]) for x in ob}),
        "per_device_examples_per_step": sorted({tuple(x["per_device"]) for x in ob}),
        "max_loss_abs_diff": max((abs(a - b) for a, b in pairs), default=None),
        "max_loss_rel_diff": max((abs(a - b) / abs(a) for a, b in pairs), default=None),
        "max_grad_norm_rel_diff": max((abs(a - b) / abs(a) for a, b in gpairs), default=None),
        "same_learning_rates": ref["lrs"] == other["lrs"],
        "same_manifest_steps": [c["step"] for c in ref["manifest"] or []]
        == [c["step"] for c in other["manifest"] or []],
        "max_lr_mean_rel_diff": max(
            (
                abs(a["lr_mean"] - b["lr_mean"]) / a["lr_mean"]
                for a, b in zip(ref["manifest"] or [], other["manifest"] or [])
            ),
            default=None,
        ),
        "adapters": {},
    }
    for name in ref["checkpoint_dirs"]:
        if (other["out"] / name).is_dir():
            res["adapters"][name] = adapter_diff(ref["out"] / name, other["out"] / name)
    return res


def summary(run: dict, examples_per_step: int) -> dict:
    names = ("processes", "cli", "set_device", "returncode", "wall_s", "stderr_tail", "stdout_is_one_json_document")
    keep = {k: run[k] for k in (*names, "stdout_json_documents") if k in run}
    if run["returncode"] == 0 and "losses" in run:
        keep.update(losses=run["losses"], log_history_jsonl_loss_lines=run["log_history_jsonl_loss_lines"])
    if run["returncode"] != 0 or not run["workers"] or run["workers"][0] is None:
        return keep
    w0 = run["workers"][0]
    keep.update(
        {
            "plan": w0["plan"],
            "throughput": throughput(run, examples_per_step),
            "losses": run["losses"],
            "grad_norms": run["grad_norms"],
            "manifest": run["manifest"],
            "log_history_jsonl_loss_lines": run["log_history_jsonl_loss_lines"],
            "base_model_loaded_on": {w["rank"]: w["loaded_on"] for w in run["workers"] if w},
            "peak_memory_gib": {w["rank"]: w.get("peak_memory_gib") for w in run["workers"] if w},
            "packs_per_step": sorted({tuple(b["packs"]) for b in step_batches(run)}),
        }
    )
    return keep


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the torchrun run (GPUs on cuda)")
    ap.add_argument("--examples-per-step", type=int, default=None, help="effective_batch_size (default 128; tiny 8)")
    ap.add_argument("--steps-per-epoch", type=int, default=None, help="default 8 (tiny: 3)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--pack-tokens", type=int, default=8192)
    ap.add_argument("--learning-rate", type=float, default=2e-5)
    ap.add_argument("--lora-r", type=int, default=128)
    ap.add_argument("--lora-alpha", type=int, default=512)
    ap.add_argument("--mean-words", type=float, default=None, help="mean words (220: ~355 tokens; tiny 60)")
    ap.add_argument("--min-words", type=int, default=20)
    ap.add_argument("--max-words", type=int, default=None, help="default 1250 (tiny: 200)")
    ap.add_argument("--prompt-share", type=float, default=0.4)
    ap.add_argument("--words", type=int, default=None, help="distinct words (default 6000; tiny 400)")
    ap.add_argument("--tokenizer-vocab", type=int, default=None, help="default 8000 (tiny: 1000)")
    ap.add_argument("--max-seq-length", type=int, default=2048)
    ap.add_argument("--max-positions", type=int, default=4096)
    ap.add_argument("--save-bf16", action="store_true", help="save the base weights in bf16 (half the disk)")
    ap.add_argument("--repeat-single", action="store_true", help="the 1-process run twice: the noise floor")
    ap.add_argument("--cli-check", action="store_true", help="also `lessctl warmup` itself under torchrun")
    ap.add_argument("--retry-set-device", action="store_true", help="on failure, rerun with torch.cuda.set_device")
    ap.add_argument("--run-timeout", type=int, default=540)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep the workspaces here (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="the report (default: $OUT/train_multigpu.json when OUT is set)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--set-device", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tiny = args.shape == "tiny"
    defaults = {
        "examples_per_step": 8 if tiny else 128,
        "steps_per_epoch": 3 if tiny else 8,
        "mean_words": 60.0 if tiny else 220.0,
        "max_words": 200 if tiny else 1250,
        "words": 400 if tiny else 6000,
        "tokenizer_vocab": 1000 if tiny else 8000,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    import torch
    import transformers

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    if cuda and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc}: this machine has {torch.cuda.device_count()} GPU(s)")
    if args.examples_per_step % args.nproc:
        raise SystemExit("--examples-per-step must divide by --nproc (lessctl's effective_batch_size rule)")
    n = args.examples_per_step * args.steps_per_epoch  # whole steps: every process gets the same share
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="train-multigpu-"))
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    recs = write_data(root / "data" / "synth.jsonl", n, args)
    model_info = build_model_folder(root / "model", recs, args, args.device)
    log(f"workspace in {root} ({time.perf_counter() - t0:.0f}s): {n} examples, {model_info['parameters']:,} params")
    runs: dict[str, dict] = {}
    # --nproc 1 (a machine of one GPU): the 1-process runs alone, the baseline and noise floor of a later N-GPU run
    names = ["single"] + (["single_repeat"] if args.repeat_single else []) + (["multi"] if args.nproc > 1 else [])
    for name in names:
        nproc = 1 if name.startswith("single") else args.nproc
        cfg = write_workspace(root / name, root / "model", root / "data" / "synth.jsonl", args)
        launched = launch(args, cfg, nproc)
        if launched["returncode"] != 0 and name == "multi" and args.retry_set_device and cuda:
            runs["multi_as_is"] = {**launched, "workers": [], "out": None}
            shutil.rmtree(cfg.parent)
            cfg = write_workspace(root / name, root / "model", root / "data" / "synth.jsonl", args)
            launched = launch(args, cfg, nproc, set_device=True)
        runs[name] = read_run(cfg, nproc, launched) if launched["returncode"] == 0 else {**launched, "workers": []}
    if args.cli_check:
        cfg = write_workspace(root / "cli", root / "model", root / "data" / "synth.jsonl", args)
        launched = launch(args, cfg, args.nproc, cli=True)
        runs["cli"] = read_run(cfg, args.nproc, launched) if launched["returncode"] == 0 else {**launched}

    eps = args.examples_per_step
    single, multi = runs["single"], runs.get("multi", {})
    lengths = [b["tokens"] / b["n_examples"] for b in (single.get("workers") or [{}])[0].get("batches", [])]
    report = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "config", "set_device")},
        "model": model_info,
        "examples": n,
        "mean_tokens": sum(lengths) / len(lengths) if lengths else None,
        "runs": {k: summary(v, eps) for k, v in runs.items() if k != "multi_as_is"},
    }
    if "multi_as_is" in runs:
        report["runs"]["multi_as_is"] = {k: v for k, v in runs["multi_as_is"].items() if k not in ("workers", "out")}
    ok = single.get("returncode") == 0 and multi.get("returncode") == 0
    if ok:
        report["single_vs_multi"] = compare(single, multi)
        t1 = report["runs"]["single"]["throughput"]["examples_per_s"]
        t2 = report["runs"]["multi"]["throughput"]["examples_per_s"]
        report["examples_per_s"] = {"1": t1, str(args.nproc): t2}
        report["speedup"] = t2 / t1 if t1 and t2 else None
    if args.nproc == 1 and single.get("returncode") == 0:
        report["examples_per_s"] = {"1": report["runs"]["single"]["throughput"]["examples_per_s"]}
    if single.get("returncode") == 0 and runs.get("single_repeat", {}).get("returncode") == 0:
        report["single_vs_single_repeat"] = compare(single, runs["single_repeat"])
    if single.get("returncode") == 0 and runs.get("cli", {}).get("returncode") == 0:
        report["single_vs_cli_multi"] = compare(single, runs["cli"])
    print_report(report)
    out = args.out or (str(Path(os.environ["OUT"]) / "train_multigpu.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2, default=str))
        log(f"report: {out}")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return report


def print_report(r: dict) -> None:
    print(f"packed warmup, {r['settings']['shape']} ({r['model']['parameters']:,} params) on {r['device']}: "
          f"{r['examples']} examples x {r['settings']['epochs']} epochs, {r['settings']['examples_per_step']} a step, "
          f"{r['mean_tokens'] or 0:.0f} tokens on average")  # fmt: skip
    for name, run in r["runs"].items():
        if run.get("returncode") != 0:
            print(f"{name:14} FAILED (rc {run.get('returncode')})")
            continue
        t = run.get("throughput") or {}
        eps = f"{t['examples_per_s']:8.2f}" if t.get("examples_per_s") else "       -"
        print(f"{name:14} {run['processes']} proc  {eps} examples/s over {t.get('timed_steps')} steps  "
              f"losses {' '.join(f'{x:.4f}' for x in run.get('losses', []))}")  # fmt: skip
    for key in ("single_vs_multi", "single_vs_single_repeat", "single_vs_cli_multi"):
        c = r.get(key)
        if not c:
            continue
        last = list(c["adapters"].values())[-1] if c["adapters"] else {}
        print(f"{key}: same examples {c['same_examples_every_step']}, per device {c['per_device_examples_per_step']}, "
              f"max loss diff {c['max_loss_abs_diff']:.3g} (rel {c['max_loss_rel_diff']:.3g}), grad-norm rel "
              f"{c['max_grad_norm_rel_diff']:.3g}, final adapter rel {last.get('rel_diff_all', float('nan')):.3g} "
              f"(lora_B {last.get('rel_diff_lora_B', float('nan')):.3g})")  # fmt: skip
    if r.get("speedup"):
        print(f"speed-up {r['speedup']:.2f}x ({r['examples_per_s']})")


if __name__ == "__main__":
    main()
