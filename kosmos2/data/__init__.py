"""Training data: GRIT / text / interleaved / instruction streams, mixing, checkpointable iterators, and converters
of your own data into them (see docs/data.md).

Entry point: `kosmos2.data.mixing.build_train_loader(DataConfig(...), tokenizer, rank, world_size)`.
"""
