"""Training pieces: the optimizer step fused into backward, memory measurement, optimizers."""
