"""The training recipe (setup, fit, checkpoints), its step with hook points, the epoch loop,
and what survives a restart."""
