"""Datasets as LightningDataModules over WebDataset shards (images now, tokens later).

Shard writing and the manifest are in :mod:`.shards`, ImageFolder packing in :mod:`.pack`, the
embedded ``shapes`` set in :mod:`.shapes`, the rank-balanced resumable stream in :mod:`.stream`
and the registered DataModules in :mod:`.datamodule`.
"""
