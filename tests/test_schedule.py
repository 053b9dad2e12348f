import pytest

from loraprune.core.schedule import is_update_step, ramp_bounds, ratio_at


def test_cubic_ramp_values():
    # 100 steps, warm-up 10, ramp ends at 80
    assert ramp_bounds(100, 0.1, 0.2) == (10, 80)
    assert ratio_at(5, 100, 0.5) == 0.0
    assert ratio_at(10, 100, 0.5) == 0.0
    p = (45 - 10) / 70
    assert ratio_at(45, 100, 0.5) == pytest.approx(0.5 * (1 - (1 - p) ** 3))
    assert ratio_at(80, 100, 0.5) == 0.5
    assert ratio_at(100, 100, 0.5) == 0.5
    vals = [ratio_at(s, 100, 0.5) for s in range(101)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))


def test_update_steps_include_the_end_of_the_ramp():
    ups = [s for s in range(1, 101) if is_update_step(s, 100, 7, 0.1, 0.2)]
    assert ups[-1] == 80 and 80 % 7 != 0
    assert all(s % 7 == 0 for s in ups[:-1]) and all(10 < s < 80 for s in ups[:-1])
    # one-step run: the final ratio is applied at step 1
    assert is_update_step(1, 1, 5, 0.1, 0.2) and ratio_at(1, 1, 0.3) == 0.3
