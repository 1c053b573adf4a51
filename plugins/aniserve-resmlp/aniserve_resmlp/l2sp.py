"""L2-SP (Li, Grandvalet, Davoine, ICML 2018): fine-tune every parameter, with a penalty
α·Σ‖θ − θ₀‖² pulling the weights toward the pretrained θ₀ rather than toward zero, so
scarce new data refines what the pretraining learned instead of overwriting it."""

from __future__ import annotations

import torch


class L2SP:
    """Fine-tune all parameters with a penalty toward the pretrained weights (L2-SP)."""

    description = "fine-tune all parameters, penalising distance from the pretrained weights (L2-SP)"

    def __init__(self):
        self.weight = 0.0
        self.reference: dict[str, torch.Tensor] = {}

    def prepare(self, model, options: dict):
        self.weight = float(options.get("l2sp_weight", 1e-3))
        if self.weight < 0:
            raise ValueError(f"l2sp_weight must be ≥ 0, got {self.weight}")
        self.reference = {name: p.detach().clone() for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def penalty(self, model) -> torch.Tensor:
        total = None
        for name, p in model.named_parameters():
            if name in self.reference:
                term = (p - self.reference[name].to(p)).pow(2).sum()
                total = term if total is None else total + term
        return self.weight * total
