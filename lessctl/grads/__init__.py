"""The grads stage: per-example gradient features of every data set at every checkpoint, into HDF5 stores.

stage (checkpoints x data sets) -> collector (batches, staging rows) -> engine (one backward per
batch, per-example products) -> adam (LESS's optimizer-state transform) -> projection -> store.
"""
