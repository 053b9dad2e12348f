"""The pruning ramp: a pure function of the step."""
from __future__ import annotations


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
