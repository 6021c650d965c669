"""Known-answer checks of lessctl's Triton kernels: what decides, once per device and shape, whether a kernel is used.

Each check runs the kernel on small random inputs that reach its edge cases and compares it with its
reference (fast_jl, or the torch gather); it never raises: a missing triton, a failed compilation or a wrong
answer is a "no" with the reason, and the caller takes the reference path and says so.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def cached(cache: dict, key: Hashable, check: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
    """`check()`'s (ok, detail), computed once per key."""
    if key not in cache:
        cache[key] = check()
    return cache[key]


def triton_problem() -> str | None:
    """Why triton cannot be used here, or None."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        return f"cannot import triton ({first_line(exc)})"
    return None


def compare(
    pairs: Iterable[tuple[Callable[[], Any], Any]], reference: str, rtol: float, tail: str = ""
) -> tuple[bool, str]:
    """Runs each kernel call of `pairs` ((call, expected tensor)) and compares it with its expected result.

    The verdict is on the largest max |got - expected| / max |expected| over the pairs; an exception in a
    call is a failed check naming its first line.
    """
    worst = 0.0
    try:
        for call, ref in pairs:
            got = call()
            worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30)))
    except Exception as exc:  # noqa: BLE001 - no kernel image, out of resources, a compiler error: not usable here
        return False, f"the Triton kernel failed ({first_line(exc)})"
    if not worst <= rtol:
        return False, f"the Triton kernel differs from {reference} by {worst:.1e} (relative; at most {rtol:g}{tail})"
    return True, f"matches {reference} ({worst:.0e} relative)"
