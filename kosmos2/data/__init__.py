"""Training data: GRIT / text / interleaved streams, mixing and checkpointable iterators (see docs/data.md).

Entry point: `kosmos2.data.mixing.build_train_loader(DataConfig(...), tokenizer, rank, world_size)`.
"""
