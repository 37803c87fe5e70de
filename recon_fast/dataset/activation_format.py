"""The folder SAELens trains from: a Hugging Face `datasets` dataset saved to disk, as sae-lens
6.54.12's CacheActivationsRunner writes it (with datasets 5.x) and its ActivationsStore reads it
back (`datasets.load_from_disk(cached_activations_path)`, then the column named by the SAE
config's hook_name, and token_ids).

    DIR/dataset_info.json     the features: one Array2D(shape=(context_size, d_in), dtype) per hook,
                              named by the hooked module's name, and token_ids (int32, length=context_size)
    DIR/state.json            the Arrow files in dataset order, a fingerprint, no format
    DIR/data-{k:05d}.arrow    shard k: Arrow IPC stream files, one row per window

Written with pyarrow alone (no `datasets` import here): an Array2D column is Arrow's
list<list<value>> with datasets' extension name and (shape, dtype) in the field's metadata, which
datasets turns back into its Array2DExtensionType on load; token_ids is a fixed-size list. Each
record batch stays under 2^31 values per column (Arrow's 32-bit list offsets). The schema's
metadata holds datasets' own "huggingface" features key and the run's config hash (the same in
every shard, so the files concatenate), which --resume checks.

Arrow has no bfloat16: dtype="bfloat16" stores each value rounded to bfloat16, in float32 columns
(exact; SAELens's own runner cannot write bfloat16 at all, datasets' Array2D refuses the type),
so a training config with dtype="bfloat16" gets exactly those values. float16 halves the disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from recon_fast.dataset.writing import atomic_write

SAELENS_VERSION = "6.54.12"  # the sae-lens whose runner this folder matches, checked by tests/saelens_side
DATASET_INFO = "dataset_info.json"
STATE = "state.json"
META_KEY = b"recon_fast"
TOKEN_IDS = "token_ids"
ARRAY2D = "datasets.features.features.Array2DExtensionType"
# The dtype a user asks for -> (how it is held on the host and in Arrow, datasets' dtype name).
DTYPES = {"float32": (np.float32, "float32"), "float16": (np.float16, "float16"), "bfloat16": (np.float32, "float32")}
_MAX_VALUES = 2**31 - 1  # per list column and record batch: Arrow's int32 offsets


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {', '.join(DTYPES)} (bfloat16 is stored as float32 "
                         "holding bfloat16-rounded values: Arrow has no bfloat16)")


def shard_name(k: int) -> str:
    return f"data-{k:05d}.arrow"


def shard_index(name: str) -> int | None:
    """k of a shard's file name, else None."""
    if name.startswith("data-") and name.endswith(".arrow") and name[5:-6].isdigit():
        return int(name[5:-6])
    return None


def features(hooks: dict[str, int], context_size: int, dtype: str) -> dict:
    """datasets' Features of the folder, as dataset_info.json spells them. token_ids is spelled
    "Sequence" (datasets 3.x's name, which 4.x and 5.x still read, as List(int32, length)): the
    runner under datasets 5.x writes "List", which datasets 3.x, still allowed by sae-lens, cannot
    read. Both load as the same feature."""
    arrow_dtype = DTYPES[dtype][1]
    found = {name: {"shape": [context_size, d_in], "dtype": arrow_dtype, "_type": "Array2D"}
             for name, d_in in hooks.items()}
    found[TOKEN_IDS] = {"feature": {"dtype": "int32", "_type": "Value"}, "length": context_size, "_type": "Sequence"}
    return found


def schema(hooks: dict[str, int], context_size: int, dtype: str, config_sha256: str):
    import pyarrow as pa

    value = pa.from_numpy_dtype(DTYPES[dtype][0])
    fields = [pa.field(name, pa.list_(pa.list_(value)), metadata={
        b"ARROW:extension:name": ARRAY2D.encode(),
        b"ARROW:extension:metadata": json.dumps([[context_size, d_in], DTYPES[dtype][1]]).encode()})
        for name, d_in in hooks.items()]
    fields.append(pa.field(TOKEN_IDS, pa.list_(pa.int32(), context_size)))
    info = {"info": {"features": features(hooks, context_size, dtype)}}
    return pa.schema(fields, metadata={b"huggingface": json.dumps(info).encode(),
                                       META_KEY: json.dumps({"config_sha256": config_sha256}).encode()})


def write_shard(path: Path, values: dict[str, np.ndarray], token_ids: np.ndarray, rows: int, context_size: int,
                dtype: str, config_sha256: str) -> int:
    """Writes one shard atomically: values[name] is [>= rows, context_size, d_in] (the first
    `rows` are written), token_ids [>= rows, context_size]. Returns the bytes written."""
    import pyarrow as pa

    hooks = {name: array.shape[-1] for name, array in values.items()}
    table_schema = schema(hooks, context_size, dtype, config_sha256)
    per_batch = max(1, min(rows, _MAX_VALUES // (context_size * max(hooks.values()))))
    with atomic_write(path) as f:
        sink = pa.PythonFile(f, mode="w")
        with pa.ipc.new_stream(sink, table_schema) as writer:
            for start in range(0, rows, per_batch):
                stop = min(rows, start + per_batch)
                columns = [_array2d(values[name][start:stop], field.type)
                           for name, field in zip(hooks, table_schema)]
                ids = np.ascontiguousarray(token_ids[start:stop], dtype=np.int32).reshape(-1)
                columns.append(pa.FixedSizeListArray.from_arrays(pa.array(ids), context_size))
                writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=table_schema))
        return sink.tell()


def _array2d(block: np.ndarray, list_type):
    """[rows, context_size, d_in] -> list<list<value>> over the same memory (no copy of the values)."""
    import pyarrow as pa

    rows, context_size, d_in = block.shape
    flat = np.ascontiguousarray(block).reshape(-1)
    values = pa.Array.from_buffers(list_type.value_type.value_type, len(flat), [None, pa.py_buffer(flat)])
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, len(flat) + 1, d_in, dtype=np.int32)), values)
    return pa.ListArray.from_arrays(pa.array(np.arange(0, rows * context_size + 1, context_size, dtype=np.int32)),
                                    inner)


def read_shard(path: Path) -> tuple[dict, np.ndarray] | None:
    """(the run metadata, token_ids [rows, context_size] int32) of a committed shard, reading it
    whole through a memory map (only token_ids' pages are touched); None if it is missing or
    does not read (a shard cut short is traced again)."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
            meta = json.loads(table.schema.metadata[META_KEY])
            column = table.column(TOKEN_IDS)
            size = table.schema.field(TOKEN_IDS).type.list_size
            ids = np.concatenate([c.flatten().to_numpy() for c in column.chunks]) if column.num_chunks else \
                np.zeros(0, np.int32)
            hooks = {f.name: json.loads(f.metadata[b"ARROW:extension:metadata"])[0][1]
                     for f in table.schema if f.name != TOKEN_IDS}
            return {**meta, "hooks": hooks}, ids.reshape(-1, size)
    except Exception:  # missing, truncated or corrupt: pyarrow's errors are of several kinds
        return None


def fingerprint(config_sha256: str, shards: list[str]) -> str:
    """16 hex digits standing for the dataset's content, as datasets' own fingerprints look."""
    return hashlib.sha256(json.dumps([config_sha256, shards]).encode()).hexdigest()[:16]


def write_index(out_dir: Path, hooks: dict[str, int], context_size: int, dtype: str, shards: list[str],
                config_sha256: str) -> None:
    """dataset_info.json, then state.json listing `shards` (file names, in dataset order)."""
    info = {"citation": "", "description": "", "features": features(hooks, context_size, dtype), "homepage": "",
            "license": ""}
    state = {"_data_files": [{"filename": name} for name in shards],
             "_fingerprint": fingerprint(config_sha256, shards), "_format_columns": None, "_format_kwargs": {},
             "_format_type": None, "_output_all_columns": False, "_split": None}
    for name, document in ((DATASET_INFO, info), (STATE, state)):
        with atomic_write(out_dir / name) as f:
            f.write(json.dumps(document, indent=2).encode())
