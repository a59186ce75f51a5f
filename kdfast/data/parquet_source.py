"""`parquet:GLOB`: Parquet files (as `datasets.Dataset.to_parquet` writes them) as a map-style data set.

Columns: `image_column` ("image") holds each image file's bytes, as a binary column or as the struct
{bytes, path} of Hugging Face's Image feature; `label_column` ("label") an integer label; `id_column` ("id", when
the files have it) the example's key, else the key is `<file name>:<row>`. Labels and keys are read up front,
columnar (no Python object per row); an image is read on demand with its whole row group, of which each process
keeps the last one. So sequential reads (scoring) read each row group once, while training's shuffled order
reads a row group per example: shards meant for training want small row groups (make_shards writes 64 rows).
"""
from __future__ import annotations

import os

import numpy as np

from kdfast.data.shard_index import KeyList, ShardIndex, assemble, expand_shards
from kdfast.data.sharded import ShardedDataset, need_extra
from kdfast.errors import DataError

IMAGE_COLUMN, LABEL_COLUMN, ID_COLUMN = "image", "label", "id"


def _image_type_ok(pa, t) -> bool:
    binary = (pa.types.is_binary(t) or pa.types.is_large_binary(t))
    return binary or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and
                      (pa.types.is_binary(t.field("bytes").type) or pa.types.is_large_binary(t.field("bytes").type)))


def read_file_index(path: str, image_column: str, label_column: str, id_column: str | None,
                    id_given: bool) -> tuple[ShardIndex, np.ndarray]:
    """(index of one Parquet file: labels and keys, the end row of each row group)."""
    pa, pq = need_extra("pyarrow"), need_extra("pyarrow.parquet")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # not Parquet, truncated: the file is the cause
        raise DataError(f"dataset 'parquet': cannot read {path} ({type(exc).__name__}: {exc})") from exc
    schema = pf.schema_arrow
    has = schema.names
    wanted = [image_column, label_column] + ([id_column] if id_given else [])
    missing = [c for c in wanted if c not in has]
    if missing:
        names = f"column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"
        raise DataError(f"dataset 'parquet': {path} has no {names}; its columns are {', '.join(has)} (choose them "
                        "with --image-column / --label-column / --id-column)")
    image_type = schema.field(image_column).type
    if not _image_type_ok(pa, image_type):
        raise DataError(f"dataset 'parquet': column {image_column!r} of {path} holds {image_type}, not image bytes "
                        "(binary, or a struct {bytes, path})")
    if not pa.types.is_integer(schema.field(label_column).type):
        raise DataError(f"dataset 'parquet': the label column {label_column!r} of {path} holds "
                        f"{schema.field(label_column).type}, not int")
    use_id = id_column if id_column in has else None
    table = pf.read(columns=[label_column] + ([use_id] if use_id else []))
    labels = table.column(label_column)
    if labels.null_count:
        row = int(np.flatnonzero(labels.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"dataset 'parquet': row {row} of {path} has no label (null in {label_column!r})")
    labels = labels.to_numpy().astype(np.int64)
    n = len(labels)
    if use_id:
        ids = table.column(use_id)
        if ids.null_count:
            row = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"dataset 'parquet': row {row} of {path} has no id (null in {use_id!r})")
        keys = KeyList.from_arrow(ids)
    else:
        import pyarrow.compute as pc
        rows = pc.cast(pa.array(np.arange(n, dtype=np.int64)), pa.string())
        keys = KeyList.from_arrow(pc.binary_join_element_wise(os.path.basename(path), rows, ":"))
    ends = np.cumsum([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)], dtype=np.int64)
    empty = np.zeros(n, dtype=np.int64)
    return ShardIndex(empty, empty, labels, keys), ends


class ParquetDataset(ShardedDataset):
    def __init__(self, pattern: str, *, image_size: int = 224, augment: bool = False, num_classes: int | None = None,
                 image_column: str | None = None, label_column: str | None = None, id_column: str | None = None):
        self.pattern = pattern
        self.image_column = image_column or IMAGE_COLUMN
        label_column = label_column or LABEL_COLUMN
        paths = expand_shards(pattern, "parquet")
        read = [read_file_index(p, self.image_column, label_column, id_column or ID_COLUMN, id_column is not None)
                for p in paths]
        indexes, self.row_group_ends = [r[0] for r in read], [r[1] for r in read]
        if not sum(len(i) for i in indexes):
            raise DataError(f"dataset 'parquet': the files of {pattern!r} hold no rows")
        shards, keys, labels = assemble("parquet", paths, indexes)
        self._group = (None, None)  # ((shard, row group), its image column): the last row group read
        super().__init__("parquet", shards, keys, labels, image_size=image_size, augment=augment,
                         num_classes=num_classes)

    def __getstate__(self):
        return {**super().__getstate__(), "_group": (None, None)}

    def with_augment(self, augment: bool) -> "ParquetDataset":
        view = super().with_augment(augment)
        view._group = (None, None)
        return view

    def read(self, index: int) -> bytes:
        shard = self.names.shard(index)
        row = index - self.shards[shard].start
        ends = self.row_group_ends[shard]
        group = int(np.searchsorted(ends, row, side="right"))
        if self._group[0] != (shard, group):
            pq = need_extra("pyarrow.parquet")
            pf = self.handle(shard, pq.ParquetFile)
            try:
                column = pf.read_row_group(group, columns=[self.image_column]).column(0).combine_chunks()
            except Exception as exc:
                raise DataError(f"dataset 'parquet': cannot read row group {group} of shard "
                                f"{self.shards[shard].name} ({type(exc).__name__}: {exc})") from exc
            if need_extra("pyarrow").types.is_struct(column.type):  # Hugging Face's Image feature: {bytes, path}
                column = column.field("bytes")
            self._group = ((shard, group), column)
        value = self._group[1][row - (int(ends[group - 1]) if group else 0)]
        if not value.is_valid:
            raise DataError(f"dataset 'parquet': {self.names[index]} has no image bytes (null)")
        return value.as_buffer()

