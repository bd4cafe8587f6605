import pytest
from hypothesis import given
from hypothesis import strategies as st

from pensieve.cache import BlockPool


def test_allocates_lowest_ids_first_and_reuses_freed():
    pool = BlockPool(6)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    pool.free([1, 3])
    pool.check_integrity()
    assert pool.allocate(3) == [1, 3, 5]
    assert pool.num_free == 0 and pool.num_allocated == 6
    pool.check_integrity()


def test_cannot_fit_is_none_and_takes_nothing():
    pool = BlockPool(4)
    pool.allocate(3)
    assert not pool.can_allocate(2)
    assert pool.allocate(2) is None
    assert pool.num_free == 1
    pool.check_integrity()


@pytest.mark.parametrize("bad", [[7], [0, 0], [2]])
def test_freeing_what_is_not_allocated_is_a_bug(bad):
    pool = BlockPool(8)
    pool.allocate(2)
    with pytest.raises(RuntimeError, match="not allocated"):
        pool.free(bad)
    pool.check_integrity()


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=60))
def test_random_allocate_free_keeps_integrity(ops):
    pool = BlockPool(12)
    held: list[list[int]] = []
    for do_alloc, n in ops:
        if do_alloc or not held:
            ids = pool.allocate(n)
            assert (ids is None) == (n > pool.num_free + (0 if ids is None else len(ids)))
            if ids:
                held.append(ids)
        else:
            pool.free(held.pop(n % len(held)))
        pool.check_integrity()
        assert pool.num_allocated == sum(map(len, held))
