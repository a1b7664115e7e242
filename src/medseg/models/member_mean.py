"""One network out of several trained the same way (``train.members``): it outputs logits whose
activation is the mean of the members' probabilities, so prediction, TTA, tuning and ONNX export treat
a members bundle as a single model.

softmax(log p) = p when p sums to 1 over classes; sigmoid(log p - log(1 - p)) = p.
"""
from __future__ import annotations

import torch
from torch import nn

_EPS = 1e-7  # keeps log() finite where every member is certain; moves a probability by at most 1e-7


class MemberMean(nn.Module):
    def __init__(self, nets: list[nn.Module], class_kind: str):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.multilabel = class_kind == "multilabel"
        first = nets[0]
        # what the inference pipeline reads off a network (medseg.models contract)
        self.channels_last = bool(getattr(type(first), "channels_last", False))
        self.spatial_dims = getattr(first, "spatial_dims", 2)
        if getattr(first, "required_divisor", None) is not None:
            self.required_divisor = first.required_divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = []
        for net in self.nets:
            y = net(x)
            if isinstance(y, (list, tuple)):  # deep supervision: the full-resolution head
                y = y[0]
            y = y.float()
            probs.append(torch.sigmoid(y) if self.multilabel else torch.softmax(y, dim=1))
        p = torch.stack(probs).mean(0).clamp(_EPS, 1 - _EPS)
        return torch.log(p) - torch.log1p(-p) if self.multilabel else torch.log(p)
