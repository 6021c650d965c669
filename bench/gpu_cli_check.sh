#!/usr/bin/env bash
# End-to-end check of `lessctl grads` on a GPU through the CLI, in the demo workspace: one projector (TRAK's CUDA
# projection, or PROJECTOR=sketch) eager and with --compile, then the rows of both stores compared (cosine per
# row), then `lessctl match` on the compiled stores. Writes into $1 (default /tmp).
set -euo pipefail
root="${1:-/tmp}"
projector="${PROJECTOR:-cuda}"
python -m lessctl.cli demo --device cuda --no-train --dir "$root/demo" | tail -4
cd "$root/demo"
python -m lessctl.cli grads --projector "$projector" --dims 512 --force --device cuda 2>&1 | tail -6
rm -rf "$root/grads_eager" && cp -r out/grads "$root/grads_eager"
python -m lessctl.cli grads --projector "$projector" --dims 512 --force --device cuda --compile 2>&1 | tail -6
python - "$root/grads_eager" out/grads <<'PY'
import sys, pathlib, h5py, numpy as np
a, b = map(pathlib.Path, sys.argv[1:3])
worst = 1.0
for f in sorted(a.glob("*.h5")):
    with h5py.File(f) as x, h5py.File(b / f.name) as y:
        names = []
        x.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and o.ndim == 2 and o.dtype.kind == "f" else None)
        for k in names:
                u, v = x[k][:].astype(np.float64), y[k][:].astype(np.float64)
                cos = (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1) + 1e-30)
                worst = min(worst, float(cos.min()))
                print(f.name, k, u.shape, "min row cosine eager vs compiled", round(float(cos.min()), 6))
print("worst", worst)
PY
python -m lessctl.cli match --dim 512 2>&1 | tail -4
