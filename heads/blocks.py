"""Small layer stacks shared by the heads, named after the pieces they build (docs/method.md,
"Stage two: the SPP-SCL head")."""
from __future__ import annotations

from torch import nn

FUSION_WIDTH = 64  # hidden width of the classifier MLP (docs/method.md, "Stage two: the SPP-SCL head")


def projection(in_features: int, dim: int, dropout: float) -> nn.Sequential:
    """P_I / P_T: Linear -> BN -> ReLU -> Dropout -> Linear -> BN, giving I/T_contra."""
    return nn.Sequential(nn.Linear(in_features, dim), nn.BatchNorm1d(dim), nn.ReLU(),
                         nn.Dropout(dropout), nn.Linear(dim, dim), nn.BatchNorm1d(dim))


def align(dim: int, dropout: float) -> nn.Sequential:
    """Align: X_a = Dropout(ReLU(BN(Linear(X_contra))))."""
    return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Dropout(dropout))


def classifier(in_features: int, n_classes: int, dropout: float) -> nn.Sequential:
    """Linear(in, 64) -> BN -> ReLU -> Dropout -> Linear(64, n_classes)."""
    return nn.Sequential(nn.Linear(in_features, FUSION_WIDTH), nn.BatchNorm1d(FUSION_WIDTH),
                         nn.ReLU(), nn.Dropout(dropout), nn.Linear(FUSION_WIDTH, n_classes))


def embedding(in_features: int, dim: int, dropout: float) -> nn.Sequential:
    """Linear -> BN -> ReLU -> Dropout: a pooled feature into the D-dim loss space."""
    return nn.Sequential(nn.Linear(in_features, dim), nn.BatchNorm1d(dim), nn.ReLU(),
                         nn.Dropout(dropout))


def qkv(dim: int, dropout: float) -> nn.Sequential:
    """CMF query / key / value map: Linear(D, D) -> Dropout."""
    return nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
