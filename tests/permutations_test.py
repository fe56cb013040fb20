"""mm_tf.proxy.permutations: the greedy max-min selection reaches the minimum Hamming
distance it claims (computed here independently), is seeded and deterministic, and the
set survives a save/load round trip."""

import itertools

import numpy as np
import pytest

from mm_tf.proxy import permutations


@pytest.fixture(scope="module")
def default_set():
    return permutations.select_permutations(1000, seed=0)


def _min_distance_by_loops(perms):
    """Independent check: smallest Hamming distance over all pairs, row by row."""
    perms = np.asarray(perms, np.int64)
    best = perms.shape[1]
    for i in range(len(perms) - 1):
        best = min(best, int((perms[i + 1:] != perms[i]).sum(axis=1).min()))
    return best


def test_default_set_is_1000_distinct_permutations(default_set):
    assert default_set.shape == (1000, 9) and default_set.dtype == np.int8
    assert (np.sort(default_set, axis=1) == np.arange(9)).all()
    assert len(np.unique(default_set, axis=0)) == 1000


def test_claimed_minimum_hamming_distance(default_set):
    # The module docstring claims 5 for P = 1000, seed 0 (mean 8.01).
    assert _min_distance_by_loops(default_set) == 5
    assert permutations.min_hamming_distance(default_set) == 5
    assert abs(permutations.mean_hamming_distance(default_set) - 8.01) < 0.01


def test_max_min_beats_the_summed_criterion():
    summed = permutations.select_permutations(300, seed=0, criterion="sum")
    max_min = permutations.select_permutations(300, seed=0, criterion="min")
    assert _min_distance_by_loops(max_min) > _min_distance_by_loops(summed)


def test_selection_is_seeded_and_deterministic(default_set):
    np.testing.assert_array_equal(permutations.select_permutations(1000, seed=0), default_set)
    other = permutations.select_permutations(50, seed=1)
    assert not np.array_equal(other, default_set[:50])
    # A prefix of the greedy sequence does not depend on how many more follow.
    np.testing.assert_array_equal(permutations.select_permutations(50, seed=0),
                                  default_set[:50])


def test_small_n_exhausts_all_permutations():
    perms = permutations.select_permutations(24, seed=3, n=4)
    assert sorted(map(tuple, perms)) == sorted(itertools.permutations(range(4)))


def test_save_load_and_reuse(tmp_path):
    perms = permutations.select_permutations(20, seed=5)
    path = permutations.save(perms, str(tmp_path))
    np.testing.assert_array_equal(permutations.load(path), perms)
    np.testing.assert_array_equal(permutations.load(str(tmp_path)), perms)
    # A resumed run reloads the saved set instead of selecting anew (even with a new seed).
    np.testing.assert_array_equal(permutations.load_or_select(str(tmp_path), 20, seed=9), perms)
    with pytest.raises(ValueError, match="holds 20 permutations"):
        permutations.load_or_select(str(tmp_path), 30, seed=5)


def test_validate_rejects_bad_tables():
    with pytest.raises(ValueError, match="permutation of"):
        permutations.validate(np.zeros((2, 9), np.int8))
    with pytest.raises(ValueError, match="distinct"):
        permutations.validate(np.tile(np.arange(9), (2, 1)))
    with pytest.raises(ValueError, match="shape"):
        permutations.validate(np.arange(9))
