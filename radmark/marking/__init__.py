"""Marking: the marking-method seam and its methods, the shard pipeline that runs one over
WebDataset shards (resumable, atomic, distributed), and verification kits."""
