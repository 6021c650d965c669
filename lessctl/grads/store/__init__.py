"""The HDF5 gradient datastore: file names, crash-safe writing with resume, shards, reading, verifying.

Per file: `index` [n] int64 (row -> 0-based source line); `dim<D>/features` [n, D] float16, rows
L2-normalized (zero rows stay zero); `dim<D>/norms` [n] float32 (norms before normalization); root
attributes (ROOT_ATTRS and projector_*). Datasets are contiguous (any row range is one read) and
allocated in full at creation, so appending rows changes no HDF5 metadata but the `rows_completed`
attribute, rewritten in place after the rows are flushed: a `.part` killed at any point reopens with
all of its `rows_completed` rows intact.
"""
