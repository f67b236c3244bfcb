"""LoRA: low-rank adapters on ``nn.Linear`` layers (the book's appendix E, Hu et al. 2021).

A wrapped layer computes ``linear(x) + (alpha / rank) * x @ A @ B`` with the original weights
frozen. ``B`` starts at zero, so a freshly wrapped model computes exactly what it did before.
``merge_lora`` folds ``A @ B`` back into the Linear's weight: checkpoints keep the plain layout
(loadable without this module) and inference pays nothing for the adapters.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
from torch import nn

# Every Linear inside the transformer blocks (attention qkv/out_proj, feed-forward fc/proj).
DEFAULT_TARGETS = ("trf_blocks.*",)


class LoRALayer(nn.Module):
    """The low-rank update ``(alpha / rank) * x @ A @ B``."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as the book (nn.Linear's default init)
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The update in ``nn.Linear.weight``'s (out, in) layout."""
        return self.scale * (self.A @ self.B).T


class LinearWithLoRA(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable ``LoRALayer``."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha).to(
            device=linear.weight.device, dtype=linear.weight.dtype
        )
        for param in self.linear.parameters():
            param.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora(x)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _shared_weights(model: nn.Module) -> set[int]:
    seen, shared = set(), set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (shared if param.data_ptr() in seen else seen).add(param.data_ptr())
    return shared


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Freeze ``model`` and wrap every Linear whose name matches a ``targets`` glob; returns the names.

    Afterwards only the adapters' A and B train; unfreeze anything else (a new head) yourself.
    """
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, pattern) for pattern in targets)
    ]
    if not names:
        raise ValueError(f"no nn.Linear layer matches the LoRA targets {list(targets)}")
    shared = _shared_weights(model)
    tied = [name for name in names if model.get_submodule(name).weight.data_ptr() in shared]
    if tied:  # merging into a tied weight would change the other user (the embedding) too
        raise ValueError(f"LoRA targets {tied} have weights tied to another layer")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        _set_submodule(model, name, LinearWithLoRA(model.get_submodule(name), rank, alpha))
    return names


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Replace every ``LinearWithLoRA`` by its Linear with the update added; returns how many."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)]
    for name, module in wrapped:
        module.linear.weight += module.lora.delta_weight()
        _set_submodule(model, name, module.linear)
    return len(wrapped)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LinearWithLoRA) for m in model.modules())
