"""Is greedy generation repeatable? The previous path (`_reference.text_stop_generate`) and lessctl's
(`generate_greedy`) each run twice on the same BBH prompts in bf16, then both once in float32.

Run on a GPU from the checkout's root (data as for eval_throughput.py, in `.device/data`):
    python bench/eval_determinism.py [DATA_DIR]
Prints one JSON object: how many of the outputs differ between runs of one path, between the paths,
and between the paths in float32. Recorded run: bench/results/eval_determinism_7b_h200.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import eval_throughput as et  # noqa: E402

from lessctl._reference import text_stop_generate  # noqa: E402
from lessctl.evaluation.generation import generate_greedy  # noqa: E402


def _texts(out):
    return out[0] if isinstance(out, tuple) else out


def differ(a, b) -> int:
    return sum(x != y for x, y in zip(a, b))


def main() -> None:
    data = Path(sys.argv[1] if len(sys.argv) > 1 else ".device/data")
    model, tok = et.build("7b", data, "cuda", "bfloat16", 0, Path(tempfile.mkdtemp()))
    prompts, stop, _ = et.task_prompts("bbh", data, tok, 16, 0)
    kw = dict(max_new_tokens=96, stop=stop, batch_size=16)
    b1 = _texts(text_stop_generate(model, tok, prompts, **kw))
    b2 = _texts(text_stop_generate(model, tok, prompts, **kw))
    l1 = _texts(generate_greedy(model, tok, prompts, **kw))
    l2 = _texts(generate_greedy(model, tok, prompts, **kw))
    res = {
        "baseline_vs_itself": differ(b1, b2),
        "lessctl_vs_itself": differ(l1, l2),
        "lessctl_vs_baseline": differ(b1, l1),
        "n": len(prompts),
    }
    model32 = model.float()
    kw32 = dict(max_new_tokens=64, stop=stop, batch_size=8)
    f1 = _texts(text_stop_generate(model32, tok, prompts[:8], **kw32))
    f2 = _texts(generate_greedy(model32, tok, prompts[:8], **kw32))
    res.update(fp32_lessctl_vs_baseline=differ(f1, f2), fp32_n=8)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
