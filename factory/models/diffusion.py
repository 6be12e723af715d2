"""The latent diffusion network: MONAI ``DiffusionModelUNet`` with text cross-attention and a
null condition for classifier-free guidance.

The context is a fixed ``1 + max_tokens`` positions long: the prompt's pooled sentence
embedding, then its token embeddings, with one extra channel flagging the real positions.
Cross-attention masks the padding out, so a short prompt is not diluted by hundreds of empty
keys, and a prompt's conditioning never depends on the other prompts in its batch. The null
condition (what training drops to with probability ``cond_dropout``) is a learned token or zeros.
With ``pooled_embedding`` the first position (pooled prompt, or the null token) is also
projected onto the timestep embedding, which conditions every ResBlock.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks.crossattention import CrossAttentionBlock
from monai.networks.nets import DiffusionModelUNet

from factory.models.config import ModelConfig
from factory.models.text import TextEncoder


class KeyMaskedCrossAttention(CrossAttentionBlock):
    """MONAI's cross-attention with padded keys masked out.

    MONAI's block takes no attention mask, so the mask travels as the context's last channel
    (1 for a real position). Same parameters as the parent: checkpoints are interchangeable.
    """

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        keys, keep = context[..., :-1], context[..., -1] > 0.5
        q = self.input_rearrange(self.to_q(x))
        k = self.input_rearrange(self.to_k(keys))
        v = self.input_rearrange(self.to_v(keys))
        if self.attention_dtype is not None:
            q, k = q.to(self.attention_dtype), k.to(self.attention_dtype)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=keep[:, None, None, :],
            dropout_p=self.dropout_rate if self.training else 0.0,
            scale=self.scale,
        )
        return self.drop_output(self.out_proj(self.out_rearrange(out)))


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
        for module in self.unet.modules():
            if isinstance(getattr(module, "attn2", None), CrossAttentionBlock):
                module.attn2.__class__ = KeyMaskedCrossAttention  # adds a forward, no state
        self.pooled = None
        if d.pooled_embedding:
            width = 4 * d.channels[0]  # MONAI's timestep embedding width
            self.pooled = torch.nn.Sequential(
                torch.nn.Linear(cfg.text.hidden_size, width),
                torch.nn.SiLU(),
                torch.nn.Linear(width, width),
            )
            self.unet.time_embed.register_forward_hook(self._add_pooled)
        self._pending: torch.Tensor | None = None
        null = torch.zeros(1, 1, cfg.text.hidden_size)
        if d.null_condition == "learned":
            self.null = torch.nn.Parameter(null)
        else:
            self.register_buffer("null", null)

    @property
    def context_length(self) -> int:
        """Positions in every context: the pooled embedding plus ``max_tokens`` tokens."""
        return 1 + self.cfg.text.max_tokens

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
        expected = (self.context_length, self.cfg.text.hidden_size + 1)
        if tuple(context.shape[1:]) != expected:
            raise ValueError(
                f"context of shape {tuple(context.shape)}: expected (batch, *{expected}) "
                "from TextConditionedUNet.context"
            )
        if drop is not None:
            null = self.null_context(x.shape[0]).to(context.dtype)
            context = torch.where(drop[:, None, None], null, context)
        if self.pooled is None:
            return self.unet(x, timesteps=t, context=context)
        self._pending = self.pooled(context[:, 0, :-1])
        try:
            return self.unet(x, timesteps=t, context=context)
        finally:
            self._pending = None

    def _add_pooled(self, module, inputs, emb: torch.Tensor) -> torch.Tensor:
        """Forward hook on MONAI's ``time_embed``: timestep embedding + projected prompt."""
        return emb if self._pending is None else emb + self._pending.to(emb.dtype)

    def context(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, H) and their mask -> (B, 1 + max_tokens, H + 1)."""
        b, _, h = tokens.shape
        out = tokens.new_zeros(b, self.context_length, h + 1)
        out[:, 0, :h] = TextEncoder.pooled(tokens, mask)
        n = min(tokens.shape[1], self.cfg.text.max_tokens)
        keep = mask[:, :n].to(tokens.dtype)
        out[:, 1 : 1 + n, :h] = tokens[:, :n] * keep[..., None]
        out[:, 0, h] = 1.0
        out[:, 1 : 1 + n, h] = keep
        return out

    def null_context(self, batch: int) -> torch.Tensor:
        """The unconditional context: the null token alone, in the same shape."""
        h = self.cfg.text.hidden_size
        out = self.null.new_zeros(batch, self.context_length, h + 1)
        out[:, 0, h] = 1.0
        return out + F.pad(self.null, (0, 1, 0, self.context_length - 1))

    def drop_mask(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training: which rows drop to the null condition (probability ``cond_dropout``)."""
        return torch.rand(batch, generator=generator) < self.cfg.diffusion.cond_dropout
