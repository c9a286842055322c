"""Data: WebDataset shards in (sources, tar streams, samples, images) and out (writer), and the
in-memory arrays of the small splits (probe sets, training sets)."""
