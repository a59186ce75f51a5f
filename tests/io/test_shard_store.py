"""ShardStore: each shard's rows committed as one file once all of them came; resumable; checked on gather."""
from __future__ import annotations

import os

import numpy as np
import pytest

from _fake_datasets import keyed_digits
from kdfast.data import DataError
from kdfast.data.keys import example_keys
from kdfast.io.errors import IncompleteStoreError, JobMismatchError
from kdfast.io.shards import ShardStore

pytest.importorskip("pyarrow")


def _store(tmp_path, data, width=2):
    return ShardStore(tmp_path / "shards", shards=data.shards, width=width, keys=example_keys(data),
                      labels=data.targets.numpy())


def test_a_shard_lands_whole_when_its_last_row_comes_and_gathers_in_shard_order(tmp_path):
    data = keyed_digits()
    rng = np.random.default_rng(0)
    table = rng.standard_normal((len(data), 2)).astype(np.float32)
    store = _store(tmp_path, data)
    assert store.todo(range(len(data.shards))) == [0, 2, 3, 4, 5]  # the empty shard 1 is committed at once
    a, b = data.shards[2].start, data.shards[2].stop
    store.write(np.arange(a, a + 8), table[a:a + 8])
    assert not os.path.exists(store.path(2))  # part of a shard is never committed
    store.write(np.arange(a + 8, b), table[a + 8:b])
    with np.load(store.path(2)) as z:
        assert z["keys"].tolist() == data.keys[a:b] and z["labels"].tolist() == data.targets[a:b].tolist()
        np.testing.assert_array_equal(z["values"], table[a:b])
    with pytest.raises(IncompleteStoreError, match="4 of 6 shards were never scored"):
        store.gather()
    again = _store(tmp_path, data)  # a resumed job skips the committed shards
    assert again.todo(range(len(data.shards))) == [0, 3, 4, 5]
    for i in (5, 0, 3, 4):
        s = data.shards[i]
        again.write(np.arange(s.start, s.stop), table[s.start:s.stop])
    np.testing.assert_array_equal(again.gather(), table)


def test_other_shards_or_changed_keys_are_refused(tmp_path):
    data = keyed_digits()
    store = _store(tmp_path, data)
    for s in data.shards:
        store.todo([data.shards.index(s)])
        if s.stop > s.start:
            store.write(np.arange(s.start, s.stop), np.ones((s.stop - s.start, 2)))
    with pytest.raises(JobMismatchError, match="holds shards of another job"):
        _store(tmp_path, data, width=3)
    moved = keyed_digits(seed=1)  # the same shards, other keys (a shard rewritten with the same size and time)
    with pytest.raises(DataError, match="its keys are not those of shard train-0000.tar"):
        _store(tmp_path, moved).gather()
