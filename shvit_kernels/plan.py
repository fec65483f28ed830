"""Chains of C++ CPU ops run as one call (``csrc/inference/plan.cpp``).

A *step* is ``(op, args)``: ``x -> torch.ops.shvit_cpp.<op>(x, *args)``, its weights packed
when the step is made. The kernels' ``*_step`` functions (``pointwise``, ``shsa_inference``)
return steps; a module runs one with ``call``, and a folded fused model runs all of its
layers as a ``Plan`` (``shvit.layers.cpu_plan``). From Python each op call costs its argument
parsing and dispatch (about 5 us); a plan pays that once per forward, which at batch 1 is a
measurable share of SHViT's few milliseconds.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

Step = tuple[str, tuple]


def call(step: Step, x: Tensor) -> Tensor:
    """One step on ``x``."""
    op, args = step
    return getattr(torch.ops.shvit_cpp, op)(x, *args)


class Plan:
    """``steps`` run one after another in C++, with the tensors they were made from
    (``watch``) watched: once one of them is moved or modified in place the plan is stale and
    ``run`` returns ``None`` instead of running it."""

    def __init__(self, steps: Sequence[Step], watch: Sequence[Tensor]):
        self._plan = torch.classes.shvit_cpp.Plan()
        for op, args in steps:
            self._plan.add(op, list(args))
        self._plan.watch(list(watch))
        self._len = len(steps)

    def chunk_prefix(self, steps: int, bytes_per_pixel: float, budget: int) -> None:
        """Run the first ``steps`` steps on chunks of the batch: as many images as keep
        ``bytes_per_pixel`` times an image's height and width within ``budget`` bytes per
        intra-op thread (at least one), the results concatenated. Each of those steps must
        compute images independently."""
        self._plan.chunk_prefix(steps, float(bytes_per_pixel), budget)

    def __len__(self) -> int:
        return self._len

    def run(self, x: Tensor, end: int | None = None) -> Tensor | None:
        """``x`` after the first ``end`` steps (all of them by default), or ``None`` where a
        watched tensor changed since the plan was made (make a new one)."""
        return self._plan.run(x, -1 if end is None else end)
