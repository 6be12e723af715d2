"""Generative models: 3D VAE, 3D CLIP, latent diffusion, samplers, checkpoints, Generator.

Knows nothing of Ray. Networks are MONAI's generative modules configured by
:mod:`factory.models.config`; pipelines compose them and own no maths of their own.
"""
