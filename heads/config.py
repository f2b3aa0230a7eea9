"""The recipe's `head:` section. `heads.build_head(cfg, ...)` reads it; each head takes the settings it uses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HeadConfig:
    """Which head (`heads.list_heads()`), its margin, and Partial FC's sampling.

    `partial_fc` is the combined margin softmax: target logit s*cos(m1*theta + m2) - s*m3. ArcFace is
    (m1, m2, m3) = (1, 0.5, 0); CosFace is (1, 0, 0.4). Validated here at load (a `ValueError` the config
    loader reports against the `head` section).
    """

    name: str = "partial_fc"
    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    # Fraction of this rank's class centers scored each step (every positive, plus random negatives).
    sample_rate: float = 1.0

    def __post_init__(self) -> None:
        if not self.s > 0:
            raise ValueError(f"s must be > 0, got {self.s}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
