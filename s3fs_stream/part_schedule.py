"""The growing part sizes of a streamed upload (pure; also used by recovery).

The writer never knows the final size, so part n has size
    min(first * 2 ** ((n - 1) // PARTS_PER_STEP), largest)
where `largest` is the biggest power-of-two multiple of `first` the memory budget admits.
With 8 MiB first parts and a 64 MiB budget that is 8 MiB ×1000, 16 MiB ×1000, then 32 MiB:
10,000 parts reach 273 GiB; a 3 GiB budget allows 2 GiB parts and 5.9 TiB. The schedule is derivable from the parts themselves (part 1 is
`first`, the largest part seen is at most `largest`), which is what lets recovery tell a full
part from a provisional short one.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_PARTS = 10_000
PARTS_PER_STEP = 1_000
MIN_PART = 5 * 1024 * 1024  # S3's minimum for every part but the last
MAX_PART = 5 * 1024**3


def largest_part_for_budget(first: int, max_memory: int) -> int:
    """The biggest part one writer may fill: it is held whole while it fills, and beside it
    the budget keeps room for at least one first-size part of any other writer."""
    largest = first
    while largest * 2 <= MAX_PART and first + largest * 2 <= max_memory:
        largest *= 2
    return largest


@dataclass(frozen=True)
class PartSchedule:
    first: int
    largest: int

    def __post_init__(self):
        if self.first < MIN_PART:
            raise ValueError(f"part_size must be at least {MIN_PART} bytes (S3's minimum)")
        if self.largest < self.first:
            raise ValueError("largest part smaller than the first")

    @classmethod
    def for_budget(cls, first: int, max_memory: int) -> PartSchedule:
        return cls(first, largest_part_for_budget(first, max_memory))

    def size(self, number: int) -> int:
        """Size of part `number` (1-based) when full."""
        if not 1 <= number <= MAX_PARTS:
            raise ValueError(f"part number {number} outside 1..{MAX_PARTS}")
        return min(self.first << ((number - 1) // PARTS_PER_STEP), self.largest)

    def start(self, number: int) -> int:
        """Byte offset where part `number` begins."""
        offset = 0
        full_steps, rest = divmod(number - 1, PARTS_PER_STEP)
        for step in range(full_steps):
            offset += PARTS_PER_STEP * self.size(step * PARTS_PER_STEP + 1)
        return offset + rest * self.size(full_steps * PARTS_PER_STEP + 1)

    @property
    def max_object_size(self) -> int:
        return self.start(MAX_PARTS) + self.size(MAX_PARTS)

    def locate(self, offset: int) -> tuple[int, int]:
        """(part number, offset within that part) of a byte offset; ValueError past the end."""
        base = 0
        number = 1
        while number <= MAX_PARTS:
            size = self.size(number)
            step_end = min((number - 1) // PARTS_PER_STEP * PARTS_PER_STEP + PARTS_PER_STEP,
                           MAX_PARTS)
            span = (step_end - number + 1) * size
            if offset < base + span:
                index, within = divmod(offset - base, size)
                return number + index, within
            base += span
            number = step_end + 1
        raise ValueError(f"offset {offset} is beyond the largest object this schedule allows "
                         f"({self.max_object_size} bytes)")


def recoverable_prefix(sizes: dict[int, int]) -> list[int]:
    """Part numbers that can be joined into an object without silently dropping bytes.

    Takes parts 1, 2, ... while they are contiguous and each one before the last has exactly
    its schedule size. The schedule comes from the parts: part 1's size is the first step, the
    largest part seen bounds the cap. A short (provisional) part is valid only as the last one.
    """
    if 1 not in sizes:
        return []
    first = sizes[1]
    largest = max(sizes.values())
    taken: list[int] = []
    number = 1
    while number in sizes:
        taken.append(number)
        expected = min(first << ((number - 1) // PARTS_PER_STEP), largest)
        if sizes[number] != expected:
            break
        number += 1
    return taken
