"""The transformer MLP shared by the backbones."""
import torch
from torch import nn


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 on (..., C) tokens; keys ``fc1``, ``fc2`` as in the public models."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
