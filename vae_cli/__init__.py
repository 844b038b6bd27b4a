"""vae: train, evaluate and sample variational autoencoders from Hydra configs."""

__version__ = "0.1.0"
