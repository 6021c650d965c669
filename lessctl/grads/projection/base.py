"""The projector contract every projection of gradient rows implements; the check that two projections agree."""

from __future__ import annotations

import abc
from typing import Any, ClassVar


class Projector(abc.ABC):
    """Projects rows of a [B, P] feature matrix to [B, D] float32, one fixed random matrix per dim.

    The contract the collector and the store rely on:
    - `kind`: the `--projector` value that makes it (a `vocab.PROJECTOR_KINDS` name);
    - `project(x)`: [B, P] rows of any float dtype -> [B, D] float32;
    - `attrs`: what makes its matrix unique, recorded in every store it writes (`projector_*`);
    - `max_rows`: the most rows one `project` call should take (None: any; the collector fills calls up to it);
    - `engine_note()`: one line saying what computes the projection, for the user, or None.
    """

    kind: ClassVar[str]
    max_rows: int | None = None

    def __init__(self, grad_dim: int, dim: int, device: Any, seed: int = 0, model_id: int = 0):
        self.grad_dim, self.dim, self.device, self.seed, self.model_id = grad_dim, dim, device, seed, model_id

    @abc.abstractmethod
    def project(self, x):
        """[B, P] rows -> [B, D] float32."""

    def engine_note(self) -> str | None:
        return None

    @property
    def attrs(self) -> dict:
        return {
            "kind": self.kind,
            "type": "rademacher",
            "seed": self.seed,
            "model_id": self.model_id,
            "grad_dim": self.grad_dim,
        }


def same_projection(a: dict, b: dict) -> list[str]:
    """Differences between two stores' projector attributes that make their features incomparable."""
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
