"""Plumbing below the maths: devices and precision, torchrun/DDP, checkpoints, atomic
files, random state."""
