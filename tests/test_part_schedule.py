from hypothesis import given
from hypothesis import strategies as st

from s3fs_stream.part_schedule import (
    MAX_PARTS,
    PartSchedule,
    largest_part_for_budget,
    recoverable_prefix,
)

MiB = 1024 * 1024


def test_default_schedule_grows_past_fixed_8mib_limit():
    schedule = PartSchedule.for_budget(8 * MiB, 64 * MiB)
    assert schedule.size(1) == 8 * MiB
    assert schedule.size(1000) == 8 * MiB
    assert schedule.size(1001) == 16 * MiB
    assert schedule.size(2001) == 32 * MiB
    assert schedule.size(3001) == 32 * MiB  # capped by the 64 MiB budget
    assert schedule.max_object_size > 78 * 1024 * MiB
    assert schedule.max_object_size == (1000 * 8 + 1000 * 16 + 8000 * 32) * MiB


def test_larger_budget_allows_larger_parts():
    assert largest_part_for_budget(8 * MiB, 64 * MiB) == 32 * MiB
    assert largest_part_for_budget(8 * MiB, 1024 * MiB) == 512 * MiB
    big = PartSchedule.for_budget(8 * MiB, 2048 * MiB)
    assert big.max_object_size > 2 * 1024**4


def test_default_budget_reaches_s3s_largest_object():
    """3 GiB (an eighth of a 24 GiB machine) allows 2 GiB parts: past S3's 5 TiB."""
    assert PartSchedule.for_budget(8 * MiB, 3072 * MiB).max_object_size > 5 * 1024**4


@given(st.integers(min_value=0, max_value=10**13))
def test_locate_agrees_with_start(offset):
    schedule = PartSchedule.for_budget(8 * MiB, 1024 * MiB)
    if offset >= schedule.max_object_size:
        return
    number, within = schedule.locate(offset)
    assert 1 <= number <= MAX_PARTS
    assert 0 <= within < schedule.size(number)
    assert schedule.start(number) + within == offset


def test_recoverable_prefix_stops_at_first_short_part():
    full = 8 * MiB
    assert recoverable_prefix({1: full, 2: full, 3: 100}) == [1, 2, 3]
    # a short provisional part 2 followed by a full part 3: joining would drop bytes
    assert recoverable_prefix({1: full, 2: 5 * MiB, 3: full}) == [1, 2]
    assert recoverable_prefix({1: full, 3: full}) == [1]  # not contiguous
    assert recoverable_prefix({2: full}) == []


def test_recoverable_prefix_follows_growth_and_cap():
    sizes = {n: 8 * MiB for n in range(1, 1001)}
    sizes.update({n: 16 * MiB for n in range(1001, 2001)})
    sizes.update({n: 16 * MiB for n in range(2001, 2005)})  # capped at 16 MiB
    sizes[2005] = 1234
    assert recoverable_prefix(sizes) == list(range(1, 2006))
