"""The engine's weights are copied into a huge-page mapping (model/hugepages.py): same values,
C order, cache-line aligned, and, where the kernel offers transparent huge pages, advised so."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from model.hugepages import huge_page_copies

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vma_flags(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address`."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head[1], 16) <= address < int(head[2], 16)
        elif inside and ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields


def test_copies_keep_values_and_layout() -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((300, 7), dtype=np.float32).T, rng.standard_normal(5).astype(np.float32)]
    copies = huge_page_copies(arrays)
    for a, c in zip(arrays, copies, strict=True):
        assert np.array_equal(a, c) and c.dtype == a.dtype and c.shape == a.shape
        assert c.flags.c_contiguous and c.ctypes.data % 64 == 0
    copies[0][0, 0] = 123.0  # a copy, not a view of the source
    assert arrays[0][0, 0] != 123.0


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_copies_are_advised_huge_pages() -> None:
    # 1 MiB: below the 4 MiB from which numpy advises huge pages for its own arrays. (No control
    # on a plain array: malloc may place it in memory numpy advised earlier in the process.)
    (copy,) = huge_page_copies([np.ones((512, 512), dtype=np.float32)])
    assert _vma_flags(copy.ctypes.data).get("THPeligible") == "1"
