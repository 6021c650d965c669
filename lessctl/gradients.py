"""Per-example gradient features (LESS.md section 3), batched, and the optimizer-state transforms.

One forward/backward pass serves a whole batch: hooks on the LoRA Linear layers keep each layer's
input X [B, T, in] and output gradient G [B, T, out]; example b's weight gradient is G_b^T X_b. The
loss of a batch is the sum of each example's mean token loss, so each example's gradient is exactly
the one a batch of one gives (tested against `naive_gradients`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from lessctl.errors import InputError, MissingArtifactError

log = logging.getLogger(__name__)

GRAD_TYPES = ("adam", "sgd", "sign")


def trainable_parameters(model) -> list[tuple[str, Any]]:
    """The parameters whose gradients make the feature, in `named_parameters()` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def pad_batch(seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int, device):
    """Right-padded input ids, labels (-100 on padding) and attention mask, [B, T] each."""
    import torch

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), T), -100, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        att[i, : len(s)] = 1
    return ids.to(device), lab.to(device), att.to(device)


def per_example_loss(logits, labels):
    """Mean next-token cross-entropy over each example's label tokens: [B] (0 where none)."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    count = (shift_labels != -100).sum(dim=1)
    return tok.sum(dim=1) / count.clamp(min=1), count


def naive_gradients(model, seqs, labels, pad_id: int = 0):
    """The reference: one example at a time, autograd on the trainable parameters. [B, P] float32."""
    import torch

    params = [p for _, p in trainable_parameters(model)]
    dev = params[0].device
    rows = []
    for s, l in zip(seqs, labels):
        ids, lab, att = pad_batch([s], [l], pad_id, dev)
        loss, _ = per_example_loss(model(input_ids=ids, attention_mask=att).logits, lab)
        grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


class PerExampleGradients:
    """Per-example gradients of the trainable weights from one batched forward/backward.

    Two ways to hook the model, same result:
    - a peft LoRA model (every trainable parameter is the lora_A or lora_B weight of a LoRA Linear
      layer): each layer's input X [B, T, in] and output gradient G [B, T, out] give, per example,
      grad B = s G^T (X A^T) and grad A = s (G B)^T X. With `merge=True` the adapter is merged into the
      base weights for the pass (peft's `merge`), so the forward and backward run the plain bf16 model
      without the LoRA branch; the weights are restored exactly by `remove()`;
    - any other model whose trainable parameters are Linear weights: hooks on those Linear layers,
      example b's gradient is G_b^T X_b.
    Only activation gradients are computed (no weight gradients): the backward asks for the gradient of
    the input embeddings' output, and the per-example products run inside the backward's tensor hooks,
    as soon as each layer's G exists, writing each parameter's slice through a `sink`.
    """

    def __init__(self, model, merge: bool = False, compile: bool = False):
        import torch

        self.model = model
        self.params = trainable_parameters(model)
        if not self.params:
            raise InputError("the model has no trainable parameters (is a LoRA adapter loaded?)")
        self.offsets: dict[int, tuple[int, int]] = {}
        offset = 0
        for _, p in self.params:
            self.offsets[id(p)] = (offset, p.numel())
            offset += p.numel()
        self.grad_dim = offset
        self.device = self.params[0][1].device
        self._handles: list = []
        self._sink = None
        self._restore: list = []
        self.timer = _NullTimer()
        self.lora = _lora_layers(model, self.params)
        # (module, per-example products of (X, G), output features, output dtype) for every hooked layer
        self.targets: list[tuple[Any, Any, int, Any]] = []
        if self.lora is not None:
            for layer, name, a, b, s in self.lora:
                base = layer.get_base_layer()
                self.targets.append((layer, self._lora_products(a, b, s), base.out_features, base.weight.dtype))
        else:
            for name, p in self.params:
                mod_name, _, leaf = name.rpartition(".")
                mod = model.get_submodule(mod_name)
                if leaf != "weight" or not isinstance(mod, torch.nn.Linear) or (mod.bias is not None and mod.bias.requires_grad):
                    raise InputError(f"batched gradients support trainable Linear weights only; {name} is not one")
                self.targets.append((mod, self._linear_products(p), mod.out_features, mod.weight.dtype))
        self._emb_out = None
        self._xf = (None, None)
        self._head = _plain_head(model)  # (decoder body, lm_head) when the loss may skip unlabelled positions
        self._compiled = False  # `compile`: the blocks run compiled, the hooks add probes
        self._blocks: list = []
        for mod, products, _, _ in self.targets:
            self._handles.append(mod.register_forward_hook(self._eager_hook(products)))
        self._handles.append(model.get_input_embeddings().register_forward_hook(self._embedding_hook))
        if merge:
            self.merge()
        if compile:
            self.compile()

    # -- hooks
    def _embedding_hook(self, mod, inputs, output):
        if self._sink is None:
            return None
        if not output.requires_grad:  # merged (or frozen) weights: nothing else makes the graph
            output = output.detach().requires_grad_(True)
        self._emb_out = output
        return output

    def _eager_hook(self, products):
        def hook(mod, inputs, output):
            if self._sink is None or not output.requires_grad:
                return
            x = inputs[0].detach()
            output.register_hook(lambda g: products(x, g))

        return hook

    def _linear_products(self, p):
        def products(x, g):
            import torch

            with self.timer.gpu_part("assemble"), _tf32():
                rows = torch.einsum("bto,bti->boi", g.float(), x.float())
            self._sink(p, rows.reshape(rows.shape[0], -1))

        return products

    def _lora_products(self, a, b, s):
        def products(x, g):
            import torch

            from lessctl.kernels import bmm_f32, has_bmm_f32

            with self.timer.gpu_part("assemble"):
                if x.dtype == g.dtype == torch.bfloat16 and has_bmm_f32(x.device):
                    # bf16 operands (the activations are bf16 already), float32 accumulation and output
                    xs, gs, bmm, precision = x, g, bmm_f32, contextlib.nullcontext()
                else:
                    xs, gs, bmm, precision = self._float_input(x), g.float(), torch.bmm, _tf32()
                with precision:
                    u = (xs @ a.detach().to(xs.dtype).T).mul_(s)  # [B, T, r]: lora_A's output, times s
                    v = (gs @ b.detach().to(xs.dtype)).mul_(s)  # [B, T, r]: the gradient at lora_A's output
                    ga = bmm(v.transpose(1, 2), xs)  # [B, r, in]
                    gb = bmm(gs.transpose(1, 2), u)  # [B, out, r]
                del xs, gs, u, v
            n = ga.shape[0]
            self._sink(a, ga.reshape(n, -1))
            self._sink(b, gb.reshape(n, -1))

        return products

    def _float_input(self, x):
        """x as float32; q, k and v share their input, so the last conversion is kept for the next layer."""
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
        if self._xf[0] != key:
            self._xf = (key, x.float())
        return self._xf[1]

    def compile(self) -> None:
        """Run every later pass with the model's repeated blocks (its decoder layers) under torch.compile.

        Tensor hooks cannot live inside a compiled graph, so the compiled pass captures G differently: each
        hooked layer's output gets a zero "probe" added, a leaf tensor whose gradient is exactly the layer's
        output gradient, and the hook keeps the layer's input on the module; both are traced into the graph.
        Compiling the blocks one by one (regional compilation) gives two graphs whatever the depth (the first
        block's input needs no gradient, the others' do), which compile in about 35 s at 7B on an H100 where the
        whole model took 260 s; inside each block the norms, rotary embedding, activations and residual adds
        fuse. No attention mask is passed: the batches are right-padded, so under the causal mask no real
        token attends to padding, and padding carries no label. Models without `_no_split_modules` (the
        blocks transformers names) are compiled whole.
        """
        if self._compiled:
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        for mod, *_ in self.targets:
            mod._lessctl_probe = None
            self._handles.append(mod.register_forward_hook(_probe_hook))
        names = set(getattr(self.model, "_no_split_modules", None) or [])  # a peft wrapper forwards the attribute
        self._blocks = [m for m in self.model.modules() if type(m).__name__ in names] or [self.model]
        for m in self._blocks:
            m.compile(dynamic=True)
        self._compiled = True

    # -- merging
    def merge(self) -> None:
        """Merge the LoRA adapter into the base weights until `remove()`: the forward then skips the LoRA branch."""
        import torch

        if self.lora is None:
            raise InputError("merge: the trainable parameters are not (only) peft LoRA weights")
        with torch.no_grad():
            for layer, name, a, b, s in self.lora:
                w = layer.get_base_layer().weight
                self._restore.append((layer, name, w, w.detach().to("cpu", copy=True)))
                w.add_((b.float() @ a.float()).mul_(s))  # the delta in float32, rounded once into w's dtype
                layer.merged_adapters.append(name)  # peft's forward now runs the base layer alone

    def remove(self) -> None:
        import torch

        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self._blocks:
            m._compiled_call_impl = None  # what nn.Module.compile set
        self._blocks = []
        if self._compiled:
            for mod, *_ in self.targets:
                del mod._lessctl_probe
                mod.__dict__.pop("_lessctl_input", None)
        self._compiled = False
        with torch.no_grad():
            for layer, name, w, saved in self._restore:
                w.copy_(saved.to(w.device))  # exact: unmerging by subtraction would leave rounding behind
                if name in layer.merged_adapters:
                    layer.merged_adapters.remove(name)
        self._restore = []

    # -- passes
    def _loss(self, ids, att, lab, labels):
        """Each example's mean loss over its label tokens [B] and their counts [B]: `per_example_loss` of the logits
        against the padded labels `lab`.

        For a causal LM whose head is just `lm_head(last hidden state)` (PLAIN_HEADS), the head runs on the label
        positions only, found on the host from the label lists `labels` (no synchronisation): the logits of prompt
        and padding tokens, float32 [tokens, vocab] in the loss, would get no gradient anyway."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        B, T = ids.shape
        if self._head is None:
            return per_example_loss(self.model(input_ids=ids, attention_mask=att, use_cache=False).logits, lab)
        body, head = self._head
        nxt = [np.asarray(l[1:], dtype=np.int64) for l in labels]  # the token each position predicts
        at = [np.flatnonzero(n != -100) for n in nxt]
        pos = np.concatenate([i * T + a for i, a in enumerate(at)] + [np.zeros(0, np.int64)])
        row = np.repeat(np.arange(len(at)), [len(a) for a in at])
        tgt = np.concatenate([n[a] for n, a in zip(nxt, at)] + [np.zeros(0, np.int64)])
        count = torch.bincount(torch.from_numpy(row), minlength=B)
        pos_d, row_d, tgt_d = (torch.from_numpy(v).to(ids.device, non_blocking=True) for v in (pos, row, tgt))
        hidden = body(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
        logits = head(hidden.reshape(B * T, -1).index_select(0, pos_d)).float()
        tok = F.cross_entropy(logits, tgt_d, reduction="none")
        sums = torch.zeros(B, dtype=tok.dtype, device=ids.device).index_add_(0, row_d, tok)
        count = count.to(ids.device, non_blocking=True)
        return sums / count.clamp(min=1), count

    def _backward(self, seqs, labels, pad_id: int, sink):
        """One forward/backward; `sink(param, rows [B, numel] float32)` receives every parameter's rows."""
        import torch

        ids, lab, att = pad_batch(seqs, labels, pad_id, self.device)
        self._sink = sink
        try:
            if not self._compiled:
                loss, count = self._loss(ids, att, lab, labels)
                torch.autograd.grad(loss.sum(), [self._emb_out], allow_unused=True)
            else:
                B = len(seqs)
                if B == 1:  # torch.compile specialises a size of 1 (another compilation): add a row without labels
                    ids = torch.cat([ids, torch.full_like(ids, pad_id)])
                    lab = torch.cat([lab, torch.full_like(lab, -100)])
                probes = []
                for mod, products, n, dt in self.targets:
                    p = torch.zeros((), dtype=dt, device=self.device).expand(ids.shape[0], ids.shape[1], n).requires_grad_()
                    p.register_post_accumulate_grad_hook(self._probe_done(mod, products, B))
                    mod._lessctl_probe = p
                    probes.append(p)
                loss, count = self._loss(ids, None, lab, labels)
                torch.autograd.backward(loss.sum(), inputs=probes)
                loss, count = loss[:B], count[:B]
        finally:
            self._sink, self._emb_out, self._xf = None, None, (None, None)
            if self._compiled:
                for mod, *_ in self.targets:
                    mod._lessctl_probe, mod._lessctl_input = None, None
        return loss.detach(), count

    @staticmethod
    def _probe_done(mod, products, rows: int):
        def done(p):
            g, p.grad = p.grad[:rows], None
            products(mod._lessctl_input[:rows], g)

        return done

    def __call__(self, seqs, labels, pad_id: int):
        """Returns (raw gradients [B, P] float32, loss [B], label token counts [B])."""
        import torch

        out = torch.zeros(len(seqs), self.grad_dim, dtype=torch.float32, device=self.device)

        def sink(p, rows):
            off, n = self.offsets[id(p)]
            out[:, off : off + n] = rows

        loss, count = self._backward(seqs, labels, pad_id, sink)
        return out, loss, count

    def features(self, seqs, labels, pad_id: int, grad_type: str, adam: "AdamState | None" = None, keep_raw: bool = False,
                 out=None):
        """Returns (features [B, P] float16: LESS's transform of each row, raw float16 rows or None, loss, counts).

        The transform runs per parameter slice as its rows arrive, so no [B, P] float32 matrix is ever held, and
        writes into `out` when given ([B, P] float16, e.g. the next rows of the collector's staging buffer, so the
        rows are not copied again).
        """
        import torch

        if grad_type not in GRAD_TYPES:
            raise InputError(f"--type: expected one of {', '.join(GRAD_TYPES)}, got {grad_type!r}")
        B = len(seqs)
        feats = out if out is not None else torch.empty(B, self.grad_dim, dtype=torch.float16, device=self.device)
        raw = torch.empty_like(feats) if keep_raw else None

        def sink(p, rows):
            off, n = self.offsets[id(p)]
            with self.timer.gpu_part("transform"):
                if raw is not None:
                    raw[:, off : off + n] = rows
                transform_into(rows, grad_type, adam, off, feats[:, off : off + n])
            written.add(id(p))

        written: set[int] = set()  # the parameters whose slices the hooks wrote
        loss, count = self._backward(seqs, labels, pad_id, sink)
        for _, p in self.params:  # a parameter no hook reached keeps zero features, as it always had
            if id(p) not in written:
                off, n = self.offsets[id(p)]
                for rows in (feats, raw) if raw is not None else (feats,):
                    rows[:, off : off + n] = 0
        return feats, raw, loss, count


PLAIN_HEADS = ("llama", "mistral", "qwen2", "qwen3")  # model types whose logits are lm_head(last hidden state)


def _plain_head(model):
    """(decoder body, lm_head) of a causal LM in PLAIN_HEADS (through a peft wrapper), else None: other models may
    scale or cap their logits, and get the full forward."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(lm, "config", None), "model_type", None) not in PLAIN_HEADS:
        return None
    body = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if body is None or head is None or body is lm:
        return None
    return body, head


def _probe_hook(mod, inputs, output):
    """The compiled pass's forward hook (one function for every layer, so the blocks share their graphs): keeps
    the layer's input on the module and adds the layer's zero probe to its output; outside a pass it does nothing."""
    probe = mod._lessctl_probe
    if probe is None:
        return None
    mod._lessctl_input = inputs[0].detach()
    return output + probe


def _lora_layers(model, params) -> list | None:
    """[(layer, adapter, A weight, B weight, scaling)] when every trainable parameter is the lora_A or lora_B
    weight of a plain peft LoRA Linear layer with one active adapter; None otherwise."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return None
    found, covered = [], set()
    for mod in model.modules():
        if not isinstance(mod, LoraLinear):
            continue
        names = [n for n in mod.active_adapters if n in mod.lora_A]
        if len(names) != 1:
            return None
        name = names[0]
        a, b = mod.lora_A[name].weight, mod.lora_B[name].weight
        if not (a.requires_grad and b.requires_grad) or getattr(mod, "fan_in_fan_out", False):
            return None
        if mod.use_dora.get(name) or mod.lora_bias.get(name) or name in getattr(mod, "lora_variant", {}):
            return None
        found.append((mod, name, a, b, float(mod.scaling[name])))
        covered.update((id(a), id(b)))
    if not found or covered != {id(p) for _, p in params}:
        return None
    return found


class _tf32:
    """TF32 for float32 matmuls on CUDA inside the block: the per-example products multiply bf16 activations,
    which TF32 represents exactly, and accumulate in float32."""

    def __enter__(self):
        import torch

        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = self.prev


# ----------------------------------------------------------------------------- optimizer state


@dataclass
class AdamState:
    exp_avg: Any  # [P] float32
    exp_avg_sq: Any  # [P] float32
    beta1: float
    beta2: float
    eps: float


def load_adam_state(ckpt_dir: Path, params: list[tuple[str, Any]], device) -> AdamState:
    """The checkpoint's Adam moments flattened in parameter order.

    Reads `optimizer.pt` whether its state is keyed by position (a plain Trainer run) or by
    parameter name (an FSDP run): entries are taken in order and each must match its parameter's shape.
    """
    import torch

    path = Path(ckpt_dir) / "optimizer.pt"
    if not path.is_file():
        raise MissingArtifactError(
            f"{path}: the checkpoint has no optimizer state, which adam features need; "
            "use a checkpoint saved by `lessctl warmup`, or --type sgd"
        )
    sd = torch.load(path, map_location="cpu", weights_only=False)
    state, groups = sd.get("state", {}), sd.get("param_groups", [{}])
    if groups and all(isinstance(k, int) for k in state):
        order = [i for g in groups for i in g.get("params", [])] or sorted(state)
        entries = [(i, state[i]) for i in order if i in state]
    else:
        by_name = {str(k): v for k, v in state.items()}
        names = [n for n, _ in params]
        matched = [next((k for k in by_name if n.endswith(k) or k.endswith(n)), None) for n in names]
        keys = matched if all(matched) else list(by_name)
        entries = [(k, by_name[k]) for k in keys]
    if len(entries) != len(params):
        raise InputError(f"{path}: optimizer state has {len(entries)} entries for {len(params)} trainable parameters")
    m, v = [], []
    for (key, st), (name, p) in zip(entries, params):
        if "exp_avg" not in st or tuple(st["exp_avg"].shape) != tuple(p.shape):
            got = tuple(st["exp_avg"].shape) if "exp_avg" in st else "no exp_avg"
            raise InputError(f"{path}: optimizer state {key!r} ({got}) does not match parameter {name} {tuple(p.shape)}")
        m.append(st["exp_avg"].reshape(-1).float())
        v.append(st["exp_avg_sq"].reshape(-1).float())
    g0 = groups[0] if groups else {}
    b1, b2 = g0.get("betas", (0.9, 0.999))
    return AdamState(torch.cat(m).to(device), torch.cat(v).to(device), float(b1), float(b2), float(g0.get("eps", 1e-8)))


def transform(g, grad_type: str, adam: AdamState | None = None):
    """LESS's features from raw gradients g [B, P]: adam (no bias correction, eps inside the sqrt), sgd, sign.

    The reference formula; the grads stage runs `transform_into`, the same arithmetic per parameter slice.
    """
    import torch

    if grad_type == "sgd":
        return g
    if grad_type == "sign":
        return torch.sign(g)
    if grad_type == "adam":
        assert adam is not None
        m = adam.beta1 * adam.exp_avg + (1 - adam.beta1) * g
        v = adam.beta2 * adam.exp_avg_sq + (1 - adam.beta2) * g * g
        return m / torch.sqrt(v + adam.eps)
    raise InputError(f"--type: expected one of {', '.join(GRAD_TYPES)}, got {grad_type!r}")


def transform_into(g, grad_type: str, adam: AdamState | None, offset: int, out) -> None:
    """`transform` of the rows g [B, n] (parameters offset .. offset+n), written into out [B, n] (float16).

    The same arithmetic as `transform` in four passes over g instead of nine: the [n] moment slices are
    scaled first (b2*v + eps, once per slice, not per row), then v' = addcmul, sqrt, m' = lerp(m, g, 1-b1)
    and the division straight into the float16 output. g is overwritten.
    """
    import torch

    if grad_type == "adam":
        from lessctl.kernels import adam_into

        assert adam is not None
        n = g.shape[1]
        m, v = adam.exp_avg[offset : offset + n], adam.exp_avg_sq[offset : offset + n]
        if adam_into(g, m, v, adam.beta1, adam.beta2, adam.eps, out):
            return
        denom = torch.addcmul(v * adam.beta2 + adam.eps, g, g, value=1 - adam.beta2).sqrt_()
        torch.lerp(m.expand_as(g), g, 1 - adam.beta1, out=g)
        torch.div(g, denom, out=out)
    elif grad_type in ("sgd", "sign"):
        out.copy_(g if grad_type == "sgd" else g.sign_())
    else:
        raise InputError(f"--type: expected one of {', '.join(GRAD_TYPES)}, got {grad_type!r}")


# ----------------------------------------------------------------------------- batching


BATCH_OVERHEAD_TOKENS = 256  # what one more forward/backward costs beyond its tokens (launches, hooks), in tokens


def token_batches(lengths: Sequence[int], batch_tokens: int, max_examples: int | None = None) -> Iterator[list[int]]:
    """Positions in batches of similar length, longest first, each within (longest length x size) <= batch_tokens
    and at most `max_examples` examples.

    Over the length-sorted order, the batch boundaries minimise the padded tokens plus BATCH_OVERHEAD_TOKENS
    per batch (dynamic programming): one long example among short ones would pad them all to its length.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    L = [lengths[i] for i in order]
    n = len(L)
    cap = max_examples or n
    best = [0.0] + [float("inf")] * n  # best[j]: cost of batching the first j sorted examples
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, max(-1, j - 1 - cap), -1):  # the batch is order[i:j]; its longest is L[i]
            size = j - i
            if size > 1 and L[i] * size > batch_tokens:
                break
            c = best[i] + L[i] * size + BATCH_OVERHEAD_TOKENS
            if c < best[j]:
                best[j], cut[j] = c, i
    batches = []
    j = n
    while j > 0:
        batches.append(order[cut[j] : j])
        j = cut[j]
    yield from reversed(batches)


def auto_max_batch_examples(grad_dim: int, device) -> int | None:
    """On a GPU: how many examples' [P] float16 feature rows (twice over: a batch's rows and as many waiting
    for projection) fit in a quarter of the GPU's memory; on a CPU no cap."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return max(1, int(0.25 * total // (2 * 2 * grad_dim)))


def auto_project_rows(projectors: dict, grad_dim: int, device) -> int:
    """Rows to gather before one projection call: a fifth of the GPU's memory (1 GiB on a CPU), at most the
    projector's `max_rows`. TRAK's CUDA projection generates its random matrix once per call, whatever the
    rows (fast_jl: up to 32, lessctl's Triton kernel: up to 256), and BasicProjector may regenerate its matrix
    on every call, so calls should be as full as memory allows."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        budget = torch.cuda.get_device_properties(torch.device(device)).total_memory // 5
    else:
        budget = 1 << 30
    rows = max(1, budget // (2 * grad_dim))  # float16 rows
    for p in projectors.values():
        if getattr(p, "kind", "") == "cuda":
            rows = min(rows, p.max_rows)
    return int(rows)


class _NullTimer:
    """The timer interface FeatureCollector reports to: `part` for host-side spans, `gpu_part` for work
    queued inside the backward (the benchmark times it with CUDA events)."""

    def part(self, name: str):
        import contextlib

        return contextlib.nullcontext()

    def gpu_part(self, name: str):
        import contextlib

        return contextlib.nullcontext()


class _Staging:
    """Rows waiting for projection in one float16 buffer that grows to what a projection call takes plus a
    batch: each batch writes its rows straight into the buffer (`reserve`), and no concatenation doubles them."""

    def __init__(self):
        self.buf = None
        self.n = 0

    def reserve(self, k: int, width: int, dtype, device, project_rows: int):
        """The next k rows, [k, width], for a batch to write into; they count as staged from now on."""
        import torch

        need = self.n + k
        if self.buf is None or need > self.buf.shape[0]:
            grown = torch.empty(max(need, project_rows + k), width, dtype=dtype, device=device)
            if self.n:
                grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.n = need
        return self.buf[need - k : need]

    def first(self, k: int):
        return self.buf[:k]

    def drop(self, k: int) -> None:
        """Forget the first k rows; the others move to the front."""
        left = self.n - k
        if left > 0:
            src = self.buf[k : self.n]
            self.buf[:left] = src.clone() if left > k else src  # overlapping ranges need a copy
        self.n = max(left, 0)


@dataclass
class Collected:
    features: dict  # dim -> [n, D] float32 numpy (unnormalized projections)
    zero_label_rows: int
    batches: list  # (examples, padded length) per forward/backward
    raw: dict | None = None  # dim -> [n, D]: projections of the raw gradients (keep_raw, for checks)


class FeatureCollector:
    """Features of many examples: batched gradients transformed slice by slice, projection in full calls.

    Gradient rows (float16, the projector's input) are gathered across batches and projected in
    multiples of `project_rows`, so each projector call is as large as it can be whatever the batch sizes.
    """

    def __init__(self, peg: PerExampleGradients, projectors: dict, grad_type: str, adam: AdamState | None = None, *,
                 pad_id: int, batch_tokens: int, max_batch_examples: int | None = None,
                 project_rows: int | None = None, timer=None, keep_raw: bool = False):
        dev = peg.device
        self.peg, self.projectors, self.grad_type, self.adam = peg, projectors, grad_type, adam
        self.pad_id, self.batch_tokens = pad_id, batch_tokens
        self.max_batch_examples = max_batch_examples if max_batch_examples is not None else auto_max_batch_examples(peg.grad_dim, dev)
        self.project_rows = project_rows or auto_project_rows(projectors, peg.grad_dim, dev)
        self.timer = timer or _NullTimer()
        self.keep_raw = keep_raw

    def __call__(self, seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> Collected:
        import numpy as np
        import torch

        n = len(seqs)
        out = {d: np.zeros((n, d), dtype=np.float32) for d in self.projectors}
        raw = {d: np.zeros((n, d), dtype=np.float32) for d in self.projectors} if self.keep_raw else None
        rows: list[int] = []  # example positions waiting for projection, in the order of the staged rows
        feats, raws = _Staging(), _Staging()
        counts: list = []
        log_batches = []

        def flush(final: bool) -> None:
            nonlocal rows
            k = len(rows) if final else len(rows) // self.project_rows * self.project_rows
            if not k:
                return
            with self.timer.part("projection"):
                for d, proj in self.projectors.items():
                    out[d][rows[:k]] = proj.project(feats.first(k)).float().cpu().numpy()
                    if raw is not None:
                        raw[d][rows[:k]] = proj.project(raws.first(k)).float().cpu().numpy()
            rows = rows[k:]
            feats.drop(k)
            raws.drop(k)

        self.peg.timer = self.timer
        try:
            for batch in token_batches([len(s) for s in seqs], self.batch_tokens, self.max_batch_examples):
                with self.timer.part("fwd_bwd"):
                    dst = feats.reserve(len(batch), self.peg.grad_dim, torch.float16, self.peg.device, self.project_rows)
                    _, r, _, count = self.peg.features([seqs[i] for i in batch], [labels[i] for i in batch], self.pad_id,
                                                       self.grad_type, self.adam, keep_raw=raw is not None, out=dst)
                    if r is not None:
                        raws.reserve(len(batch), self.peg.grad_dim, torch.float16, self.peg.device, self.project_rows)[:] = r
                    del dst, r
                counts.append(count)
                log_batches.append((len(batch), max(len(seqs[i]) for i in batch)))
                rows.extend(batch)
                flush(final=False)
            flush(final=True)
        finally:
            self.peg.timer = _NullTimer()
        zero = int(sum(int((c == 0).sum()) for c in counts))
        return Collected(out, zero, log_batches, raw)
