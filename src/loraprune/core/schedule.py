"""The pruning ramp: a pure function of the step."""
from __future__ import annotations

from dataclasses import dataclass


def ramp_bounds(total_steps: int, warmup_frac: float, cooldown_frac: float) -> tuple[int, int]:
    """(first step of the ramp, step at which the final ratio is reached). Steps count completed
    optimizer steps from 1. The final step is at least 1 so that even a 1-step run is pruned."""
    start = int(round(warmup_frac * total_steps))
    end = max(int(round((1.0 - cooldown_frac) * total_steps)), 1)
    return min(start, end), end


def ratio_at(step: int, total_steps: int, final_ratio: float, warmup_frac: float = 0.1,
             cooldown_frac: float = 0.2) -> float:
    """Cubic ramp: 0 during warm-up, final_ratio * (1 - (1 - p)^3) while ramping (p in [0, 1]),
    exactly final_ratio from the end of the ramp on (the cool-down keeps fine-tuning the final mask).
    """
    start, end = ramp_bounds(total_steps, warmup_frac, cooldown_frac)
    if step >= end:
        return float(final_ratio)
    if step <= start:
        return 0.0
    p = (step - start) / (end - start)
    return float(final_ratio) * (1.0 - (1.0 - p) ** 3)


def is_update_step(step: int, total_steps: int, prune_every: int, warmup_frac: float,
                   cooldown_frac: float) -> bool:
    """Masks change every `prune_every` steps during the ramp, and always at the step where the
    ramp ends so that the final ratio is reached exactly (not floored short of it)."""
    start, end = ramp_bounds(total_steps, warmup_frac, cooldown_frac)
    if step == end:
        return True
    return start < step < end and step % prune_every == 0


@dataclass(frozen=True)
class Ramp:
    """The schedule of one run: `total_steps` optimizer steps, masks updated every `prune_every`
    steps between warm-up and cool-down (fractions of the run)."""
    total_steps: int
    prune_every: int = 5
    warmup_frac: float = 0.1
    cooldown_frac: float = 0.2

    @classmethod
    def from_config(cls, cfg) -> "Ramp":
        return cls(cfg.steps, cfg.prune_every, cfg.warmup_frac, cfg.cooldown_frac)

    def bounds(self) -> tuple[int, int]:
        return ramp_bounds(self.total_steps, self.warmup_frac, self.cooldown_frac)

    def ratio(self, step: int, final: float) -> float:
        return ratio_at(step, self.total_steps, final, self.warmup_frac, self.cooldown_frac)

    def is_update(self, step: int) -> bool:
        return is_update_step(step, self.total_steps, self.prune_every, self.warmup_frac, self.cooldown_frac)

    def scores_matter(self, step: int) -> bool:
        """Whether scores observed after step `step` can still change a mask (not after the ramp)."""
        return step <= self.bounds()[1]
