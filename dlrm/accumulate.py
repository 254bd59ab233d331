"""Gradients that a custom autograd node adds to a parameter's .grad itself (dlrm.mlp.FusedMLP's weights,
the compiled interaction's table weights), instead of returning a tensor that autograd's AccumulateGrad
then adds there: one pass over the gradient fewer (a GEMM accumulates in place; the interaction's table
rows are added to where they lie). The node returns None for such a parameter; autograd still runs its
post-accumulate-grad hooks once the node is done (dlrm.dist.GradientBuffer counts on them).

Only ``backward()`` accumulates into .grad: under ``torch.autograd.grad`` the node must return the
gradient, as any node does.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import get_gradient_edge


def grad_to_accumulate(param: torch.Tensor) -> torch.Tensor | None:
    """``param.grad`` (made zero, in ``param``'s layout, when it has none) if the running backward will
    accumulate into it; None if the node must return ``param``'s gradient instead (autograd.grad, a
    parameter backward does not reach, or a non-leaf). Call from a node's backward only."""
    if not (param.is_leaf and param.requires_grad):
        return None
    try:
        if not torch._C._will_engine_execute_node(get_gradient_edge(param).node):
            return None
    except RuntimeError:  # raised under torch.autograd.grad, which returns gradients, never accumulates them
        return None
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad
