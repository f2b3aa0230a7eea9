"""Independent float64 implementations of every head's paper formula, for the head tests.

One process, the full class matrix, plain autograd and `F.cross_entropy`; written from the papers and the official
code's arithmetic (sqrt forms where the heads use arccos, one-hot masks where they scatter), sharing nothing with
`heads/`. Each reference takes the embeddings (N, E), the centers (C, E) or (C, K, E), the labels, the head's
settings and a `state` dict that it updates like the head's running statistics (empty at the first step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from heads import HeadConfig

Tensor = torch.Tensor


def _cosines(x: Tensor, w: Tensor) -> Tensor:
    return (F.normalize(x) @ F.normalize(w).T).clamp(-1, 1)


def _one_hot(labels: Tensor, num_classes: int, like: Tensor) -> Tensor:
    return F.one_hot(labels, num_classes).to(like.dtype)


def _cos_plus(c: Tensor, m: Tensor | float) -> Tensor:
    """cos(arccos(c) + m) by the angle-sum formula."""
    m = torch.as_tensor(m, dtype=c.dtype)
    return c * torch.cos(m) - torch.sqrt(1 - c * c) * torch.sin(m)


def arcface(x: Tensor, w: Tensor, labels: Tensor, cfg: dict[str, Any], state: dict[str, Tensor]) -> Tensor:
    """insightface HEAD's ArcFace: s*cos(theta_y + m) everywhere (no fallback), s*cos elsewhere."""
    s, m = cfg["s"], cfg["m2"]
    cos = _cosines(x, w)
    hot = _one_hot(labels, w.shape[0], cos)
    logits = s * (hot * _cos_plus(cos, m) + (1 - hot) * cos)
    return F.cross_entropy(logits, labels)


def subcenter_arcface(x: Tensor, w: Tensor, labels: Tensor, cfg: dict[str, Any], state: dict[str, Tensor]) -> Tensor:
    """Max over each class's K sub-centers (active ones), then ArcFace; counts each target's winning sub-center."""
    num_classes, k, e = w.shape
    cos_k = _cosines(x, w.reshape(num_classes * k, e)).reshape(-1, num_classes, k)
    active = state.setdefault("active", torch.ones(num_classes, k, dtype=torch.bool))
    cos_k = torch.where(active, cos_k, torch.full_like(cos_k, -2.0))
    cos, winner = cos_k.max(dim=2)
    hits = state.setdefault("hits", torch.zeros(num_classes, k, dtype=torch.int64))
    for row, label in enumerate(labels.tolist()):
        hits[label, winner[row, label]] += 1
    hot = _one_hot(labels, num_classes, cos)
    logits = cfg["s"] * (hot * _cos_plus(cos, cfg["m2"]) + (1 - hot) * cos)
    return F.cross_entropy(logits, labels)


def adaface(x: Tensor, w: Tensor, labels: Tensor, cfg: dict[str, Any], state: dict[str, Tensor]) -> Tensor:
    """AdaFace's head.py arithmetic on the whole batch: EMA of the norm statistics first, margins on every column
    through one-hot matrices, arccos and clip applied to all columns."""
    eps, s, m, h, alpha = 1e-3, cfg["s"], cfg["m"], cfg["h"], cfg["t_alpha"]
    norms = x.detach().norm(dim=1, keepdim=True).clip(1e-3, 100)
    mean = state.get("batch_mean", torch.tensor(20.0, dtype=x.dtype))
    std = state.get("batch_std", torch.tensor(100.0, dtype=x.dtype))
    state["batch_mean"] = norms.mean() * alpha + (1 - alpha) * mean
    state["batch_std"] = norms.std() * alpha + (1 - alpha) * std
    scaler = ((norms - state["batch_mean"]) / (state["batch_std"] + eps) * h).clip(-1, 1)
    cos = (F.normalize(x) @ F.normalize(w).T).clamp(-1 + eps, 1 - eps)
    hot = _one_hot(labels, w.shape[0], cos)
    theta = torch.acos(cos) + hot * (-m * scaler)
    cos = torch.cos(theta.clip(eps, math.pi - eps)) - hot * (m + m * scaler)
    return F.cross_entropy(s * cos, labels)


def magface(x: Tensor, w: Tensor, labels: Tensor, cfg: dict[str, Any], state: dict[str, Tensor]) -> Tensor:
    """MagFace's MagLinear + MagLoss: magnitude with gradient, easy margin, plus lambda_g * mean(g(a))."""
    l_a, u_a, l_m, u_m = cfg["l_a"], cfg["u_a"], cfg["l_m"], cfg["u_m"]
    a = x.norm(dim=1, keepdim=True).clamp(l_a, u_a)
    margin = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
    cos = _cosines(x, w)
    sin = torch.sqrt(1.0 - cos**2)
    cos_m = cos * torch.cos(margin) - sin * torch.sin(margin)
    if cfg.get("easy_margin", True):
        cos_m = torch.where(cos > 0, cos_m, cos)
    else:
        cos_m = torch.where(cos > torch.cos(math.pi - margin), cos_m, cos - torch.sin(math.pi - margin) * margin)
    hot = _one_hot(labels, w.shape[0], cos)
    loss = F.cross_entropy(cfg["s"] * (hot * cos_m + (1 - hot) * cos), labels)
    return loss + cfg["lambda_g"] * (a / u_a**2 + 1 / a).mean()


def curricularface(x: Tensor, w: Tensor, labels: Tensor, cfg: dict[str, Any], state: dict[str, Tensor]) -> Tensor:
    """CurricularFace's metrics.py arithmetic: t updated first, hard negatives c*(t + c), the target with th/mm."""
    s, m, alpha = cfg["s"], cfg["m"], cfg["t_alpha"]
    cos = _cosines(x, w)
    rows = torch.arange(cos.shape[0])
    target = cos[rows, labels].unsqueeze(1)
    target_m = _cos_plus(target, m)
    final_target = torch.where(target > math.cos(math.pi - m), target_m, target - math.sin(math.pi - m) * m)
    state["t"] = target.detach().mean() * alpha + (1 - alpha) * state.get("t", torch.tensor(0.0, dtype=x.dtype))
    hard = cos.detach() > target_m.detach()
    out = torch.where(hard, cos * (state["t"] + cos), cos)
    hot = _one_hot(labels, w.shape[0], cos)
    out = hot * final_target + (1 - hot) * out
    return F.cross_entropy(s * out, labels)


def elastic_margins(seed: int, draw: int, n: int, m: float, std: float) -> Tensor:
    """The documented draw: CPU generator seeded with (seed * 1_000_003 + draw) mod 2**63, float64 N(0,1)*std + m."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + draw) % 2**63)
    return torch.randn(n, dtype=torch.float64, generator=generator) * std + m


def elasticface(x: Tensor, w: Tensor, labels: Tensor, cfg: dict[str, Any], state: dict[str, Tensor]) -> Tensor:
    """ElasticFace-Arc / -Cos (and "+"): per-sample margins, paired with the samples by their target cosine."""
    draw = int(state.get("draws", torch.tensor(0)))
    state["draws"] = torch.tensor(draw + 1)
    margins = elastic_margins(cfg["seed"], draw, x.shape[0], cfg["m"], cfg["std"])
    cos = _cosines(x, w)
    rows = torch.arange(cos.shape[0])
    target = cos[rows, labels]
    if cfg.get("plus"):
        order = sorted(range(len(target)), key=lambda i: (-float(target[i].detach()), i))  # descending cosine
        ascending = sorted(margins.tolist())
        paired = [0.0] * len(order)
        for rank_in_order, row in enumerate(order):
            if cfg["pairing"] == "sorted":
                paired[row] = ascending[rank_in_order]  # closest to its center -> smallest margin
            else:
                paired[rank_in_order] = ascending[row]  # the official code: margin[order][i]
        margins = torch.tensor(paired, dtype=torch.float64)
    if cfg["kind"] == "arc":
        new_target = _cos_plus(target, margins)
    else:
        new_target = target - margins
    hot = _one_hot(labels, w.shape[0], cos)
    logits = cfg["s"] * (hot * new_target.unsqueeze(1) + (1 - hot) * cos)
    return F.cross_entropy(logits, labels)


REFERENCES = {
    "partial_fc": arcface,
    "subcenter_arcface": subcenter_arcface,
    "adaface": adaface,
    "magface": magface,
    "curricularface": curricularface,
    "elasticface": elasticface,
}


def reference_step(
    name: str, x: Tensor, w: Tensor, labels: Tensor, cfg: dict[str, Any], state: dict[str, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, d loss / d x, d loss / d w) of one step of the reference, which updates `state`."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = REFERENCES["elasticface" if name.startswith("elasticface") else name](x, w, labels, cfg, state)
    loss.backward()
    assert x.grad is not None and w.grad is not None
    return loss.detach(), x.grad, w.grad


SEED = 11  # the trainer's seed, given to `reset_parameters` (ElasticFace's margins derive from it)


def head_cases() -> dict[str, tuple[HeadConfig, dict[str, Any]]]:
    """Every registered head: (its recipe section, the reference's settings). Non-default values where a default
    would hide a mistake (a larger EMA weight, the official "+" pairing for one variant)."""
    section = HeadConfig.resolve_section()  # the recipe's `head:` section: every registered head's keys
    arc = {"s": 16.0, "m2": 0.5}
    elastic = {"s": 16.0, "seed": SEED}
    return {
        "partial_fc": (section(name="partial_fc", s=16.0), arc),
        "subcenter_arcface": (section(name="subcenter_arcface", s=16.0, subcenter_drop_epoch=1), arc),
        "adaface": (
            section(name="adaface", s=16.0, adaface_t_alpha=0.5),
            {"s": 16.0, "m": 0.4, "h": 0.333, "t_alpha": 0.5},
        ),
        "magface": (
            section(name="magface", s=16.0),
            {"s": 16.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 35.0},
        ),
        "curricularface": (
            section(name="curricularface", s=16.0, curricular_t_alpha=0.3),
            {"s": 16.0, "m": 0.5, "t_alpha": 0.3},
        ),
        "elasticface_arc": (
            section(name="elasticface_arc", s=16.0),
            {**elastic, "kind": "arc", "m": 0.5, "std": 0.05},
        ),
        "elasticface_cos": (
            section(name="elasticface_cos", s=16.0, elastic_std=0.1),
            {**elastic, "kind": "cos", "m": 0.35, "std": 0.1},
        ),
        "elasticface_arc_plus": (
            section(name="elasticface_arc_plus", s=16.0),
            {**elastic, "kind": "arc", "m": 0.5, "std": 0.0175, "plus": True, "pairing": "sorted"},
        ),
        "elasticface_cos_plus": (
            section(name="elasticface_cos_plus", s=16.0, elastic_plus_pairing="official"),
            {**elastic, "kind": "cos", "m": 0.35, "std": 0.02, "plus": True, "pairing": "official"},
        ),
    }


def state_of(head: Any) -> dict[str, Tensor]:
    """The head's running state under the reference's names."""
    names = {"batch_mean": "batch_mean", "batch_std": "batch_std", "t": "t", "margin_draws": "draws"}
    out = {names[k]: v.detach().clone() for k, v in head.global_tensors().items() if k in names}
    rows = head.row_tensors()
    if "subcenter_hits" in rows:
        out["hits"] = rows["subcenter_hits"].detach().clone()
    return out
