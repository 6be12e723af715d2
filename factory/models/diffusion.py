"""The latent diffusion network: MONAI ``DiffusionModelUNet`` with text cross-attention and a
null condition for classifier-free guidance.

The context is always ``max_tokens`` long with padding positions zeroed, so a prompt's
conditioning never depends on the other prompts in its batch. The null condition (what
training drops to with probability ``cond_dropout``) is a learned token or zeros.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet

from factory.models.config import ModelConfig


class TextConditionedUNet(torch.nn.Module):
    """UNet over image latents plus anatomy channels, conditioned on text token embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.diffusion
        self.cfg = cfg
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=cfg.latent_channels,
            out_channels=cfg.latent_channels,
            channels=d.channels,
            attention_levels=d.attention_levels,
            num_res_blocks=d.num_res_blocks,
            num_head_channels=d.num_head_channels,
            norm_num_groups=d.norm_num_groups,
            with_conditioning=True,
            cross_attention_dim=cfg.text.hidden_size,
            use_flash_attention=True,
        )
        null = torch.zeros(1, 1, cfg.text.hidden_size)
        if d.null_condition == "learned":
            self.null = torch.nn.Parameter(null)
        else:
            self.register_buffer("null", null)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from noisy latents; rows where ``drop`` is true see the null condition.

        Dropping inside ``forward`` keeps the null parameter in every graph, as DDP requires.
        """
        if drop is not None:
            null = self.null_context(x.shape[0]).to(context.dtype)
            context = torch.where(drop[:, None, None], null, context)
        return self.unet(x, timesteps=t, context=context)

    def context(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, H) -> fixed-length (B, max_tokens, H), padding zeroed."""
        out = tokens.new_zeros(tokens.shape[0], self.cfg.text.max_tokens, tokens.shape[2])
        n = min(tokens.shape[1], out.shape[1])
        out[:, :n] = tokens[:, :n] * mask[:, :n, None].to(tokens.dtype)
        return out

    def null_context(self, batch: int) -> torch.Tensor:
        """The unconditional context, as long as a conditional one."""
        return self.null.expand(batch, self.cfg.text.max_tokens, -1)

    def drop_mask(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training: which rows drop to the null condition (probability ``cond_dropout``)."""
        return torch.rand(batch, generator=generator) < self.cfg.diffusion.cond_dropout
