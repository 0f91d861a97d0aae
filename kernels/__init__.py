"""fastprune's kernels: the fused step and epoch selection, with a PyTorch reference.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run their PyTorch
specification (``reference.py``), except under ``TRITON_INTERPRET=1``, where the
Triton kernels run on CPU tensors through Triton's interpreter (how the
test-suite exercises them).  Epoch selection's pipeline (``selection.py``) runs
on every device, with that device's passes.
"""

from __future__ import annotations

import os

import torch

from . import common, reference, selection
from .reference import StepOutput
from .selection import Selection
from .state import FIELDS, SampleState


def uses_triton(t: torch.Tensor) -> bool:
    """Whether work on ``t``'s device goes through the Triton kernels."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_step(logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, **kw) -> StepOutput:
    """Fused step on the best implementation for ``logits``' device (see ``reference.step_reference``)."""
    if uses_triton(logits):
        from .step import launch_step

        return launch_step(logits, labels, indices, **kw)
    return reference.step_reference(logits, labels, indices, **kw)


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad *= grad_output in place, without a host sync."""
    if uses_triton(grad):
        from .step import launch_scale_grad

        return launch_scale_grad(grad, grad_output)
    return reference.scale_grad_reference(grad, grad_output)


class FusedLoss(torch.autograd.Function):
    """Scalar batch loss whose gradient w.r.t. the logits was written by the fused step.

    ``FusedLoss.apply(logits, contrib, grad)``: the loss is ``contrib.sum()``; backward hands back ``grad``
    times the incoming gradient (``scale_grad``, in place), once.
    """

    @staticmethod
    def forward(ctx, logits, contrib, grad):  # noqa: D102 - autograd signature
        ctx.grad = grad
        return contrib.sum()

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("fastprune: the pruned loss supports one backward pass per step "
                               "(its gradient was computed in the forward pass and is consumed by backward)")
        ctx.grad = None
        return scale_grad(grad, grad_output), None, None


def select_epoch(scores: torch.Tensor, visits: torch.Tensor, consistency: torch.Tensor, **kw) -> Selection:
    """Epoch selection (see ``selection.select_reference``) with the device's passes (kernels on CUDA)."""
    if uses_triton(scores):
        from .select import finalize_triton, priority_triton, shuffle_triton

        kw.setdefault("priority", priority_triton)
        kw.setdefault("finalize", finalize_triton)
        kw.setdefault("shuffle", shuffle_triton)
    return selection.select_reference(scores, visits, consistency, **kw)


def shuffle(keep: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's order: kept samples first, shuffled without sorting (``reference.shuffled_order``)."""
    if uses_triton(keep):
        from .select import shuffle_triton

        return shuffle_triton(keep, seed, epoch)
    return reference.shuffled_order(keep, seed, epoch)


__all__ = ["FIELDS", "FusedLoss", "SampleState", "Selection", "StepOutput", "common", "fused_step", "reference",
           "scale_grad", "select_epoch", "selection", "shuffle", "uses_triton"]
