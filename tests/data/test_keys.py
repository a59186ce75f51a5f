"""Example keys: a keyed source's own keys, an image folder's relative paths, else the index as text; exact
matching of keys to a data set's examples, refusing unknown and repeated keys in one line."""
from __future__ import annotations

import numpy as np
import pytest

from _fake_datasets import keyed_digits, write_image_folder
from kdfast.data import LabeledSubset, load_dataset
from kdfast.data.keys import KeyMatchError, example_keys, has_keys, key_positions

pa = pytest.importorskip("pyarrow")


def test_a_keyed_source_gives_its_own_keys_also_through_subsets():
    data = keyed_digits()
    keys = example_keys(data)
    assert isinstance(keys, pa.Array) and keys.type == pa.string() and keys.to_pylist() == list(data.keys)
    subset = LabeledSubset(LabeledSubset(data, [9, 3, 50, 7]), [2, 0])
    assert has_keys(subset) and example_keys(subset).to_pylist() == [data.keys[50], data.keys[9]]


def test_an_image_folder_is_keyed_by_relative_path_and_digits_by_index(tmp_path):
    files = write_image_folder(tmp_path / "imgs", per_class=2)
    folder = load_dataset("folder", root=str(tmp_path / "imgs"))
    assert example_keys(folder).to_pylist() == [f.replace("\\", "/") for f in files]
    assert "/" in example_keys(folder)[0].as_py() and not has_keys(folder)
    digits = load_dataset("digits")
    keys = example_keys(digits)
    assert len(keys) == len(digits) == 1397 and keys[0].as_py() == "0" and keys[1396].as_py() == "1396"


def test_keys_are_matched_exactly_to_their_positions():
    data = keyed_digits()
    keys = example_keys(data)
    wanted = [data.keys[i] for i in (77, 0, 119, 5)]
    np.testing.assert_array_equal(key_positions(wanted, keys, what="keep"), [77, 0, 119, 5])
    # a key that is only a tail or a stem of an example's is no match
    with pytest.raises(KeyMatchError, match=r"^keep: 1 of 2 keys match no example"):
        key_positions([data.keys[1], data.keys[2].split("/")[1]], keys, what="keep")


def test_unknown_and_repeated_keys_are_named_with_their_count():
    keys = example_keys(keyed_digits())
    with pytest.raises(KeyMatchError) as info:
        key_positions([f"nope{i}" for i in range(7)], keys, what="--keep k.parquet")
    message = str(info.value)
    assert "\n" not in message and "7 of 7 keys match no example" in message
    assert "'nope0', 'nope1', 'nope2', 'nope3', 'nope4', ... (7 in all)" in message
    with pytest.raises(KeyMatchError, match=r"--keep k.parquet: 1 keys appear more than once: 'a'"):
        key_positions(["a", "b", "a"], pa.array(["a", "b"]), what="--keep k.parquet")
    with pytest.raises(KeyMatchError, match=r"the data set: 1 keys appear more than once: 'b'"):
        key_positions(["a"], pa.array(["a", "b", "b"]), what="--keep k.parquet")
