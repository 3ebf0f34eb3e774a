"""Per-sample gradients: encoding, gradients, random projection, the shard store, and gradient similarity."""
