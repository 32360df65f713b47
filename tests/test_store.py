"""RowStore: rows streamed from a scratch file read back exactly as held in RAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryo_drvae.store import RowStore


@pytest.fixture
def rows():
    return torch.randn(37, 5, 3, generator=torch.Generator().manual_seed(0))


def fill(store: RowStore, rows: torch.Tensor) -> RowStore:
    for start in range(0, len(rows), 10):
        store.write(start, rows[start:start + 10])
    return store


def test_disk_store_reads_back_what_was_written(rows, tmp_path):
    store = fill(RowStore.on_disk(tmp_path / "a.f32", len(rows), (5, 3)), rows)
    assert (tmp_path / "a.f32").stat().st_size == rows.numel() * 4
    assert torch.equal(store.read(0, len(rows)), rows)
    assert torch.equal(store[4:9], rows[4:9])
    assert torch.equal(torch.cat([chunk for _, chunk in store.chunks(8)]), rows)
    assert store.shape == (37, 5, 3) and len(store) == 37


def test_take_any_order_with_repeats_matches_ram(rows, tmp_path):
    disk = fill(RowStore.on_disk(tmp_path / "b.f32", len(rows), (5, 3)), rows)
    ram = fill(RowStore.in_memory(len(rows), (5, 3)), rows)
    index = np.array([30, 2, 3, 4, 36, 2, 0, 17, 18])
    assert torch.equal(disk.take(index), rows[index])
    assert torch.equal(ram[index], rows[index])
    assert torch.equal(disk.to_memory().tensor, rows)


def test_remove_deletes_the_file(rows, tmp_path):
    store = fill(RowStore.on_disk(tmp_path / "c.f32", len(rows), (5, 3)), rows)
    store.remove()
    assert not (tmp_path / "c.f32").exists()
