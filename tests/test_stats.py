import math

import pytest

from near_ray.eval.stats import mean_std, paired_difference


def test_paired_difference_and_its_interval_on_constructed_numbers():
    near = [0.60, 0.55, 0.70, 0.65, 0.58]
    naive = [0.50, 0.49, 0.61, 0.60, 0.50]  # differences 0.10, 0.06, 0.09, 0.05, 0.08
    d = paired_difference(near, naive)
    assert d["n"] == 5 and d["mean_diff"] == pytest.approx(0.076)
    sd = math.sqrt(sum((x - 0.076) ** 2 for x in (0.10, 0.06, 0.09, 0.05, 0.08)) / 4)
    half = 2.7764451 * sd / math.sqrt(5)  # t(0.975, 4)
    assert d["ci95"] == pytest.approx([0.076 - half, 0.076 + half], abs=1e-6)
    assert d["ci95"][0] > 0  # the seeds' shared part cancels: separately the two spreads overlap
    assert max(naive) > min(near)


def test_identical_methods_differ_by_nothing_and_one_pair_has_no_interval():
    d = paired_difference([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert d["mean_diff"] == 0 and d["ci95"] == [0, 0]
    assert paired_difference([0.5], [0.4])["ci95"] == [None, None]
    with pytest.raises(ValueError, match="same runs"):
        paired_difference([0.1, 0.2], [0.1])
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
