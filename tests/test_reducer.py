"""Gradient buckets: whole variables, in backward order, each at least the bucket size."""

from __future__ import annotations

import pytest

from hyparflow.reducer import MAX_BUCKET, MIN_BUCKET, bucket_bounds, bucket_bytes_for


def test_buckets_cover_every_variable_once_from_the_last():
    sizes = [10, 20, 30, 40, 5]  # float32 gradients: 40, 80, 120, 160, 20 bytes
    assert bucket_bounds(sizes, 200) == [(2, 5), (0, 2)]
    assert bucket_bounds(sizes, 1) == [(4, 5), (3, 4), (2, 3), (1, 2), (0, 1)]
    assert bucket_bounds(sizes, 10_000) == [(0, 5)]
    assert bucket_bounds([], 100) == []


def test_bucket_size_is_an_eighth_of_the_stage_within_bounds(monkeypatch):
    monkeypatch.delenv("HYPARFLOW_BUCKET_MB", raising=False)
    assert bucket_bytes_for(1000) == MIN_BUCKET
    assert bucket_bytes_for(80 * 2**20) == pytest.approx(10 * 2**20)
    assert bucket_bytes_for(2**40) == MAX_BUCKET
    monkeypatch.setenv("HYPARFLOW_BUCKET_MB", "0.5")
    assert bucket_bytes_for(2**40) == 2**19
