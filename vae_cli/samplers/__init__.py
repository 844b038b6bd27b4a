"""Samplers of z for the decoder (`vae sample sampler=...`, `vae eval`'s sample scores): the
prior itself, or a density fitted after training to the training split's codes, a mixture
(gmm.py), a second VAE (two_stage.py) or a PixelCNN over discrete codes (pixelcnn.py).
They train models of their own on codes the trained VAE gives them: they use the maths of
objective/, which knows nothing of them. fitted.py keeps a fit beside its checkpoint."""
