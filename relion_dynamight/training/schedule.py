"""Training schedule (paper, Methods "Training"): warm-up, frozen-network phases, consensus updates, stop.

Epochs are numbered from 0.  The schedule is a pure function of the epoch number, so a resumed run
follows exactly the same plan as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

GAUSSIANS_ONLY = "gaussians"
ALL = "all"


@dataclass(frozen=True)
class Schedule:
    """When to train what.

    * ``warmup_epochs``: only the Gaussian parameters (positions, amplitudes, widths) are fitted.
    * every ``freeze_every`` epochs after the warm-up, the networks are frozen for ``freeze_length``
      epochs and only the Gaussian parameters are adjusted (0 disables).
    * every ``consensus_every`` network epochs, the consensus positions are replaced by the mean deformed
      model of the least-deformed particles of the half (0 disables).
    * ``checkpoint_every`` epochs a checkpoint is written (plus the final one).
    * training stops when the validation data loss has increased ``patience`` times.
    """

    n_epochs: int = 50
    warmup_epochs: int = 3
    freeze_every: int = 30
    freeze_length: int = 5
    consensus_every: int = 10
    checkpoint_every: int = 1
    patience: int = 40

    def phase(self, epoch: int) -> str:
        """``"gaussians"`` (networks frozen) or ``"all"``."""
        if epoch < self.warmup_epochs:
            return GAUSSIANS_ONLY
        if self.freeze_every > 0 and self.freeze_length > 0:
            k = epoch - self.warmup_epochs
            if k >= self.freeze_every and k % self.freeze_every < self.freeze_length:
                return GAUSSIANS_ONLY
        return ALL

    def update_consensus(self, epoch: int) -> bool:
        """True after network epoch ``epoch`` when the consensus model is to be re-centred."""
        if self.consensus_every <= 0 or self.phase(epoch) != ALL:
            return False
        k = epoch - self.warmup_epochs + 1
        return k > 0 and k % self.consensus_every == 0

    def write_checkpoint(self, epoch: int) -> bool:
        return self.checkpoint_every > 0 and (epoch + 1) % self.checkpoint_every == 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plateau:
    """Counts increases of a loss (paper: stop at the k-th increase of the data loss, k = 40)."""

    patience: int
    best: float = float("inf")
    last: float = float("inf")
    increases: int = 0
    history: list[float] = field(default_factory=list)

    def update(self, value: float) -> bool:
        """Record ``value``; True when training should stop."""
        if value > self.last:
            self.increases += 1
        self.best = min(self.best, value)
        self.last = value
        self.history.append(value)
        return self.stopped

    @property
    def stopped(self) -> bool:
        return self.increases >= self.patience

    def state(self) -> dict[str, Any]:
        return {"patience": self.patience, "best": self.best, "last": self.last, "increases": self.increases}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Plateau":
        return cls(patience=int(state["patience"]), best=float(state["best"]), last=float(state["last"]),
                   increases=int(state["increases"]))
