"""Selection strategies for active learning (issue #28's first part): registry
components; top-K concentrates where a trust band with a cap per group spreads, the
band excludes the already-good and the wild, farthest-point choice covers the
descriptor space, and every choice is reproducible from its seed."""

import numpy as np
import pytest

from aniserve.registry import registry
from aniserve.selection import Candidates


def pool(seed=0):
    """8 molecules × 40 frames: molecule m's deviations grow with m (small molecules
    look most uncertain, as for ANI-1x), 2 % of frames are wild (deviation 50)."""
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(8), 40)
    deviation = 0.5 + 0.3 * (7 - group) + rng.gamma(2.0, 0.2, len(group))
    wild = rng.choice(len(group), 6, replace=False)
    deviation[wild] = 50.0
    descriptors = np.c_[group * 10.0, rng.normal(size=len(group))]
    return Candidates(deviation, group, descriptors), wild


def strategy(name):
    return registry().get("selection-strategy", name)()


def test_every_strategy_is_a_registry_component():
    assert {"random", "top-k", "band", "band-fps"} <= set(registry().names("selection-strategy"))


def test_top_k_concentrates_where_the_band_with_a_cap_spreads():
    candidates, wild = pool()
    rng = np.random.default_rng(1)
    top = strategy("top-k").select(candidates, 32, rng)
    band = strategy("band").select(candidates, 32, rng, upper_percentile=95)
    assert len(top) == len(band) == 32
    assert set(wild) <= set(top)  # top-K takes every wild frame first
    assert np.bincount(candidates.group[top]).max() >= 16  # and half its picks from one molecule
    assert not set(wild) & set(band)  # the band's upper level (95th percentile; 2 % are wild) leaves them out
    counts = np.bincount(candidates.group[band], minlength=8)
    assert counts.max() <= 8 and (counts >= 4).sum() >= 5  # a fair share for each molecule in the band


def test_band_levels_and_percentiles_bound_the_choice():
    candidates, _ = pool()
    chosen = strategy("band").select(candidates, 50, np.random.default_rng(0), lower=1.0, upper=2.0, cap=100)
    assert len(chosen) == 50 and np.all(
        (candidates.force_deviation[chosen] >= 1.0) & (candidates.force_deviation[chosen] <= 2.0)
    )
    few = strategy("band").select(candidates, 50, np.random.default_rng(0), lower=40.0, upper=60.0)
    assert len(few) <= 6  # fewer than k when the band holds fewer
    with pytest.raises(ValueError, match="lower level 2.0 is above its upper level 1.0"):
        strategy("band").select(candidates, 5, np.random.default_rng(0), lower=2.0, upper=1.0)


def test_farthest_point_choice_covers_the_descriptor_space():
    candidates, _ = pool()
    fps = strategy("band-fps").select(candidates, 8, np.random.default_rng(3), lower_percentile=0, cap=8)
    # descriptors separate the molecules by 10 units: 8 farthest points are 8 molecules
    assert len(np.unique(candidates.group[fps])) == 8
    with pytest.raises(ValueError, match="needs descriptors"):
        strategy("band-fps").select(
            Candidates(candidates.force_deviation, candidates.group), 4, np.random.default_rng(0)
        )


@pytest.mark.parametrize("name", ["random", "top-k", "band", "band-fps"])
def test_selection_is_reproducible_and_never_repeats(name):
    candidates, _ = pool()
    first = strategy(name).select(candidates, 20, np.random.default_rng(7))
    again = strategy(name).select(candidates, 20, np.random.default_rng(7))
    assert np.array_equal(first, again) and len(np.unique(first)) == len(first) <= 20
    assert np.all((0 <= first) & (first < len(candidates.group)))


def test_bad_candidates_are_refused():
    with pytest.raises(ValueError, match="one finite force deviation and one group each"):
        Candidates(np.array([1.0, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="one finite force deviation and one group each"):
        Candidates(np.array([1.0, 2.0]), np.array([0]))
