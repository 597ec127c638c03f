"""The curriculum switch of ECI (the "gradient switch").

The switch first turns on for the bank update of meta-iteration ``adv_start``. From then
on, the mean pseudo-query accuracy of each meta-batch is tracked; once it has not beaten
its best value for ``patience`` consecutive meta-iterations, the switch turns on for the
next bank update, and the best value and the count are reset. Each time, the switch
stays on for exactly one bank update. Disabled, it never turns on (the EI ablation).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class Curriculum:
    adv_start: int
    patience: int
    enabled: bool = True
    best: float = -math.inf
    stale: int = 0
    pending: bool = False
    fired: int = 0

    def __post_init__(self) -> None:
        if self.enabled and self.adv_start == 0 and self.fired == 0:
            self.pending = True

    def take(self) -> bool:
        """Whether this bank update is adversarial; consumes the switch (one update only)."""
        on, self.pending = self.pending, False
        self.fired += int(on)
        return on

    def observe(self, iteration: int, accuracy: float) -> None:
        """Record the pseudo-query accuracy of meta-iteration ``iteration`` (0-based)."""
        if not self.enabled:
            return
        if iteration + 1 == self.adv_start:
            self.pending = True
            return
        if iteration < self.adv_start:
            return
        if accuracy > self.best:
            self.best, self.stale = accuracy, 0
        else:
            self.stale += 1
        if self.stale >= self.patience:
            self.pending, self.best, self.stale = True, -math.inf, 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
