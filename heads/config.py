"""The recipe's `head:` section. `heads.build_head(cfg, ...)` reads it; each head takes the settings it uses."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass
class HeadConfig:
    """Which head (`heads.list_heads()`), its margin, and Partial FC's sampling. Flat: each head reads its own keys
    (prefixed by its name) and ignores the others; defaults are each paper's. docs/heads.md compares the heads.

    `partial_fc` is the combined margin softmax: target logit s*cos(m1*theta + m2) - s*m3. ArcFace is
    (m1, m2, m3) = (1, 0.5, 0); CosFace is (1, 0, 0.4). Validated here at load (a `ValueError` the config
    loader reports against the `head` section: "head.<field> must ...").
    """

    name: str = "partial_fc"
    s: float = 64.0  # logit scale, every head
    m1: float = 1.0  # partial_fc and subcenter_arcface: the combined margin
    m2: float = 0.5
    m3: float = 0.0
    # Fraction of this rank's class centers scored each step (every positive, plus random negatives); every head.
    sample_rate: float = 1.0
    # How the centers move when sample_rate < 1 (README, "Partial FC at millions of classes"): `dense`, insightface's
    # Partial FC v2 (every center decays and follows its momentum every step: a table-sized gradient and pass);
    # `lazy`, the same result with SGD, each step touching only the sampled rows (the others caught up in closed
    # form when next sampled, and all of them every `lazy_sync_every` steps, at a checkpoint and at the end);
    # `sparse`, Partial FC v1 (only the sampled centers and their momentum move). AdamW: `dense` only.
    update: Literal["dense", "lazy", "sparse"] = "lazy"
    lazy_sync_every: int = 100

    # ArcFace options (partial_fc, subcenter_arcface), matching insightface HEAD by default.
    # Past theta + m2 > pi, insightface's pre-2023 fallback cos(theta) - m2*sin(pi - m2); off = cos(theta + m2).
    arcface_fallback: bool = False
    # `exact`: differentiate through the margin; `constant`: as insightface, the margin is a constant in backward.
    margin_grad: Literal["exact", "constant"] = "exact"
    # > 0: non-target cosines above it count as mislabelled duplicates: set to 0, no gradient (insightface: 0.4).
    interclass_filtering_threshold: float = 0.0

    # subcenter_arcface (Deng et al. 2020): K sub-centers per class, a class scores its closest one.
    num_subcenters: int = 3
    # > 0: from this epoch on each class keeps only its dominant sub-center (the one that won the most of its
    # samples during the previous epoch); 0 = keep all K.
    subcenter_drop_epoch: int = 0

    # adaface (Kim et al. 2022): margin adapted to the feature norm, normalized by the batch's norm statistics.
    adaface_m: float = 0.4
    adaface_h: float = 0.333  # how far the norm moves the margin (0 = CosFace with m)
    adaface_t_alpha: float = 0.01  # EMA weight of the new global batch's norm mean / std

    # magface (Meng et al. 2021): margin linear in the feature magnitude a in [l_a, u_a], from l_m to u_m.
    magface_l_a: float = 10.0
    magface_u_a: float = 110.0
    magface_l_m: float = 0.45
    magface_u_m: float = 0.8
    magface_lambda_g: float = 35.0  # weight of the magnitude regularizer (the paper's; MagFace's trainer.py: 20)
    magface_easy_margin: bool = True  # margin only where cos(theta_y) > 0, as MagFace's code

    # curricularface (Huang et al. 2020): hard negatives reweighted by the running mean target cosine t.
    curricular_m: float = 0.5
    curricular_t_alpha: float = 0.01  # EMA weight of the new global batch's mean target cosine

    # elasticface_arc / _cos and their "+" variants (Boutros et al. 2022): a margin per sample from N(m, std).
    # None = the paper's: m 0.5 (Arc), 0.35 (Cos); std 0.05 (Arc, Cos), 0.0175 (Arc+), 0.02 (Cos+).
    elastic_m: float | None = None
    elastic_std: float | None = None
    # "+": `sorted` gives the sample closest to its center the smallest margin (the pairing the official code's two
    # sorts describe); `official` repeats that code's indexing, which pairs them by neither order.
    elastic_plus_pairing: Literal["sorted", "official"] = "sorted"

    def __post_init__(self) -> None:
        finite = {
            name: getattr(self, name)
            for name in (
                "s",
                "m1",
                "m2",
                "m3",
                "interclass_filtering_threshold",
                "adaface_m",
                "adaface_h",
                "adaface_t_alpha",
                "magface_l_a",
                "magface_u_a",
                "magface_l_m",
                "magface_u_m",
                "magface_lambda_g",
                "curricular_m",
                "curricular_t_alpha",
            )
        }
        for name in ("elastic_m", "elastic_std"):
            if getattr(self, name) is not None:
                finite[name] = getattr(self, name)
        for name, value in finite.items():
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if not self.s > 0:
            raise ValueError(f"s must be > 0, got {self.s}")
        if not self.m1 > 0:
            raise ValueError(f"m1 must be > 0, got {self.m1}")
        if not 0.0 <= self.m2 < math.pi:
            raise ValueError(f"m2 must be in [0, pi), got {self.m2}")
        if self.m3 < 0:
            raise ValueError(f"m3 must be >= 0, got {self.m3}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.lazy_sync_every < 1:
            raise ValueError(f"lazy_sync_every must be >= 1, got {self.lazy_sync_every}")
        if not 0.0 <= self.interclass_filtering_threshold < 1.0:
            raise ValueError(
                f"interclass_filtering_threshold must be in [0, 1) (0 = off), got {self.interclass_filtering_threshold}"
            )
        if self.num_subcenters < 1:
            raise ValueError(f"num_subcenters must be >= 1, got {self.num_subcenters}")
        if self.subcenter_drop_epoch < 0:
            raise ValueError(f"subcenter_drop_epoch must be >= 0 (0 = never), got {self.subcenter_drop_epoch}")
        for name in ("adaface_m", "curricular_m"):
            if not 0.0 <= getattr(self, name) < math.pi / 2:
                raise ValueError(f"{name} must be in [0, pi/2), got {getattr(self, name)}")
        if self.adaface_h < 0:
            raise ValueError(f"adaface_h must be >= 0, got {self.adaface_h}")
        for name in ("adaface_t_alpha", "curricular_t_alpha"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 < self.magface_l_a < self.magface_u_a:
            raise ValueError(f"magface_l_a must be in (0, magface_u_a={self.magface_u_a}), got {self.magface_l_a}")
        if not 0.0 <= self.magface_l_m <= self.magface_u_m < math.pi / 2:
            raise ValueError(
                f"magface_l_m must be in [0, magface_u_m] and magface_u_m below pi/2, got {self.magface_l_m} and "
                f"{self.magface_u_m}"
            )
        if self.magface_lambda_g < 0:
            raise ValueError(f"magface_lambda_g must be >= 0, got {self.magface_lambda_g}")
        if self.elastic_m is not None and not 0.0 <= self.elastic_m < math.pi / 2:
            raise ValueError(f"elastic_m must be in [0, pi/2), got {self.elastic_m}")
        if self.elastic_std is not None and self.elastic_std < 0:
            raise ValueError(f"elastic_std must be >= 0, got {self.elastic_std}")
