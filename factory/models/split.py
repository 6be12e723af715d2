"""Memory-bounded decoding, MAISI's way, for MONAI's ``AutoencoderKL`` decoder.

Every convolution runs over chunks of its input along one axis, each with a halo of the
convolution's padding; GroupNorm normalises with statistics of the whole tensor, gathered chunk
by chunk, and is applied to each chunk on its way into the next convolution. The result equals
the whole decode (to float rounding), unlike slabs decoded apart with their own statistics.

Each block's output is held whole, nothing inside a block is: a block is a chain of chunk
producers (convolution, nearest upsampling, sum) over the last tensor held, recomputed for each
pass it needs (its norms' statistics, then its output). Where memory is shortest an upsampling
is not held either but recomputed inside the next block (``stream``), so that the largest
tensors, on the full grid with the most channels, never exist whole; that costs time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.blocks import UpSample
from monai.networks.nets.autoencoderkl import AEKLResBlock
from torch import nn

from factory.models.config import ConfigError

Pre = Callable[[torch.Tensor], torch.Tensor]
MAX_SPLITS = 128


class Split(NamedTuple):
    """How to decode: in ``chunks`` along one axis (1: whole, as ``vae.decode``), and whether
    upsamplings are recomputed in the next block rather than held (``stream``)."""

    chunks: int
    stream: bool = False


WHOLE = Split(1)


def ranges(n: int, splits: int) -> list[tuple[int, int]]:
    """``splits`` contiguous [start, stop) ranges covering ``0..n`` (as even as can be)."""
    splits = max(1, min(splits, n))
    edges = [round(i * n / splits) for i in range(splits + 1)]
    return list(itertools.pairwise(edges))


def split_axis(shape: torch.Size | tuple[int, ...]) -> int:
    """The tensor axis to split: the longest spatial one (the halo costs least there)."""
    spatial = list(shape[2:])
    return 2 + spatial.index(max(spatial))


class Producer:
    """A tensor along one axis, any range of it on demand: ``get(a, b)`` is ``[a, b)``."""

    length: int
    axis: int

    def get(self, a: int, b: int) -> torch.Tensor:
        raise NotImplementedError


class Held(Producer):
    """A tensor held whole."""

    def __init__(self, x: torch.Tensor, axis: int):
        self.x, self.axis, self.length = x, axis, x.shape[axis]

    def get(self, a: int, b: int) -> torch.Tensor:
        return self.x.narrow(self.axis, a, b - a)


class Conv(Producer):
    """``conv(pre(source))`` for a stride-1, zero-padded convolution; ``pre`` elementwise."""

    def __init__(self, conv: nn.Conv3d, source: Producer, pre: Pre | None = None):
        if conv.stride != (1, 1, 1) or conv.dilation != (1, 1, 1) or conv.padding_mode != "zeros":
            raise ValueError(f"split decoding needs stride-1 zero-padded convolutions, not {conv}")
        self.conv, self.source, self.pre = conv, source, pre
        self.axis, self.length = source.axis, source.length
        self.pad = conv.padding[self.axis - 2]
        self.padding = [0 if d == self.axis - 2 else p for d, p in enumerate(conv.padding)]

    def get(self, a: int, b: int) -> torch.Tensor:
        pad, n = self.pad, self.length
        lo, hi = max(a - pad, 0), min(b + pad, n)
        part = self.source.get(lo, hi)
        part = self.pre(part) if self.pre else part
        # F.pad lists (left, right) pairs from the last axis back; zeros beyond the tensor.
        widths = [0, 0] * (part.dim() - 1 - self.axis) + [pad - (a - lo), pad - (hi - b)]
        part = F.pad(part, widths) if any(widths) else part
        return F.conv3d(part, self.conv.weight, self.conv.bias, padding=self.padding)


class Nearest2(Producer):
    """``source`` upsampled x2 on every axis by nearest neighbour (voxel i is i // 2)."""

    def __init__(self, source: Producer):
        self.source, self.axis, self.length = source, source.axis, 2 * source.length

    def get(self, a: int, b: int) -> torch.Tensor:
        first, last = a // 2, (b + 1) // 2
        part = F.interpolate(self.source.get(first, last), scale_factor=2, mode="nearest")
        return part.narrow(self.axis, a - 2 * first, b - a)


class Sum(Producer):
    def __init__(self, left: Producer, right: Producer):
        self.left, self.right, self.axis, self.length = left, right, left.axis, left.length

    def get(self, a: int, b: int) -> torch.Tensor:
        return self.left.get(a, b).add_(self.right.get(a, b))


def hold(source: Producer, splits: int) -> Held:
    """``source`` computed chunk by chunk into one tensor (in the dtype its chunks come in:
    bf16 under autocast)."""
    out = None
    for a, b in ranges(source.length, splits):
        y = source.get(a, b)
        if out is None:
            shape = list(y.shape)
            shape[source.axis] = source.length
            out = y.new_empty(shape)
        out.narrow(source.axis, a, b - a).copy_(y)
        del y
    return Held(out, source.axis)


def whole(source: Producer, splits: int) -> torch.Tensor:
    """``source`` as one tensor: itself if held, else computed chunk by chunk."""
    return source.x if isinstance(source, Held) else hold(source, splits).x


def group_stats(
    norm: nn.GroupNorm, source: Producer, splits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-group mean and 1/std over the whole of ``source``, gathered chunk by
    chunk in float64 (what ``norm`` computes on the whole tensor at once)."""
    total = squares = None
    count = 0
    for a, b in ranges(source.length, splits):
        part = source.get(a, b)
        part = part.reshape(part.shape[0], norm.num_groups, -1).double()
        sums, sq = part.sum(-1), part.square().sum(-1)
        total = sums if total is None else total + sums
        squares = sq if squares is None else squares + sq
        count += part.shape[-1]
        del part
    mean = total / count
    var = (squares / count - mean.square()).clamp_min(0)
    return mean, (var + norm.eps).rsqrt()


def normaliser(norm: nn.GroupNorm, stats, silu: bool, dtype: torch.dtype) -> Pre:
    """A chunk's GroupNorm (by the whole tensor's ``stats``) and, with ``silu``, SiLU."""
    mean, rstd = stats
    per = norm.num_channels // norm.num_groups
    shape = (mean.shape[0], norm.num_channels, 1, 1, 1)
    scale = rstd.repeat_interleave(per, 1).reshape(shape)
    shift = -mean.repeat_interleave(per, 1).reshape(shape) * scale
    if norm.affine:  # one multiply-add a voxel: x * scale + shift
        weight = norm.weight.double().reshape(1, -1, 1, 1, 1)
        scale, shift = scale * weight, shift * weight + norm.bias.double().reshape(1, -1, 1, 1, 1)
    # In float32 at least, as autocast runs GroupNorm.
    dtype = torch.promote_types(dtype, torch.float32)
    scale, shift = scale.to(dtype), shift.to(dtype)

    def apply(part: torch.Tensor) -> torch.Tensor:
        y = torch.addcmul(shift, part.to(dtype), scale)
        return F.silu(y, inplace=True) if silu else y

    return apply


def res_block(block: nn.Module, x: Producer, splits: int, dtype: torch.dtype) -> Producer:
    """MONAI's AEKLResBlock: x + conv2(silu(norm2(conv1(silu(norm1(x)))))), the shortcut a 1x1
    convolution where the channels change. Three passes over ``x``: two for statistics."""
    pre1 = normaliser(block.norm1, group_stats(block.norm1, x, splits), True, dtype)
    h = Conv(block.conv1.conv, x, pre1)
    pre2 = normaliser(block.norm2, group_stats(block.norm2, h, splits), True, dtype)
    shortcut = (
        x if isinstance(block.nin_shortcut, nn.Identity) else Conv(block.nin_shortcut.conv, x)
    )
    return Sum(Conv(block.conv2.conv, h, pre2), shortcut)


def is_upsample(block: nn.Module) -> bool:
    """A MONAI UpSample this module can split: nearest x2 on every axis, then a convolution."""
    up = getattr(block, "upsample_non_trainable", None)
    if not isinstance(up, nn.Upsample) or up.mode != "nearest" or not hasattr(block, "postconv"):
        return False
    factor = up.scale_factor if isinstance(up.scale_factor, tuple) else (up.scale_factor,) * 3
    return tuple(factor) == (2.0, 2.0, 2.0)


def _is_conv(block: nn.Module) -> bool:
    conv = getattr(block, "conv", None)
    return isinstance(conv, nn.Conv3d) and len(block) == 1


@torch.no_grad()
def split_decode(vae: nn.Module, z: torch.Tensor, plan: Split) -> torch.Tensor:
    """``vae.decode(z)`` for MONAI's AutoencoderKL, in ``plan.chunks`` chunks along the longest
    spatial axis; blocks it cannot split (attention) run whole."""
    if plan == WHOLE:
        return vae.decode(z)
    splits = plan.chunks
    axis = split_axis(z.shape)
    x: Producer = Conv(vae.post_quant_conv.conv, Held(z, axis))
    dtype = z.dtype
    blocks = list(vae.decoder.blocks)
    i = 0
    while i < len(blocks):
        block = blocks[i]
        if isinstance(block, AEKLResBlock):
            x = hold(res_block(block, x, splits, dtype), splits)
        elif isinstance(block, UpSample) and is_upsample(block):
            x = Conv(block.postconv.conv, Nearest2(x))
            x = x if plan.stream else hold(x, splits)  # streamed: the next block recomputes it
        elif isinstance(block, nn.GroupNorm) and i + 1 < len(blocks) and _is_conv(blocks[i + 1]):
            # The closing GroupNorm goes into the last convolution chunk by chunk.
            pre = normaliser(block, group_stats(block, x, splits), False, dtype)
            x = hold(Conv(blocks[i + 1].conv, x, pre), splits)
            i += 1
        elif _is_conv(block):
            x = hold(Conv(block.conv, x), splits)
        else:
            x = Held(block(whole(x, splits)), axis)
        i += 1
    return whole(x, splits)


def peak_bytes(decoder: nn.Module, latent: tuple[int, ...], plan: Split, itemsize: int) -> int:
    """The decode's peak of tensor memory, estimated from the decoder's layers. Split: per held
    block output, the tensor it reads and itself, plus a few chunk-sized working tensors of
    the widest layer in its chain; whole: every layer's input, intermediates and output whole,
    as ``vae.decode`` holds them."""
    splits = plan.chunks
    b, _, *grid = latent
    voxels, axis_len, peak = math.prod(grid), max(grid), 0
    held = latent[1] * voxels  # elements of the tensor the next block reads
    widest = 0  # the widest layer (channels x voxels) since the tensor held
    for block in decoder.blocks:
        cin, cout, scale = _channels(block)
        vin, vout = voxels, voxels * scale
        if splits == 1:
            whole = cin * vin * 4 + cout * vout * (2 if scale > 1 else 1)
            peak = max(peak, whole)
        else:
            widest = max(widest, cin * vin, cout * vout)
            if scale == 1 or not plan.stream:  # held: what it read, itself, chunks of its chain
                chunk = 1 / min(splits, axis_len) + 8 / axis_len
                peak = max(peak, held + cout * vout + 3 * widest * chunk)
                held, widest = cout * vout, 0
        voxels = vout
        axis_len *= 2 if scale > 1 else 1
    return int(peak * b * itemsize)


def _channels(block: nn.Module) -> tuple[int, int, int]:
    """(input channels, output channels, voxel scale) of a decoder block."""
    if isinstance(block, AEKLResBlock):
        return block.in_channels, block.out_channels, 1
    if isinstance(block, UpSample):
        conv = block.postconv.conv
        return conv.in_channels, conv.out_channels, 8
    if isinstance(block, nn.GroupNorm):
        return block.num_channels, block.num_channels, 1
    conv = getattr(block, "conv", None)
    if isinstance(conv, nn.Conv3d):
        return conv.in_channels, conv.out_channels, 1
    channels = getattr(block, "num_channels", 1)  # attention: whole
    return channels * 3, channels, 1


def choose_split(
    decoder: nn.Module, latent: tuple[int, ...], budget_gb: float, itemsize: int
) -> Split:
    """The quickest plan whose estimated peak fits ``budget_gb``: whole, else the fewest chunks
    (2, 4, ...) holding every block, else the fewest streaming the upsamplings; a ConfigError
    saying what the budget must at least be when none fits."""
    plans = [WHOLE]
    for stream in (False, True):
        plans += [Split(2**k, stream) for k in range(1, int(math.log2(MAX_SPLITS)) + 1)]
    for plan in plans:
        if peak_bytes(decoder, latent, plan, itemsize) <= budget_gb * 2**30:
            return plan
    least = peak_bytes(decoder, latent, plans[-1], itemsize) / 2**30
    raise ConfigError(
        f"vae.decode_memory_gb: {budget_gb:g} GiB is too little to decode latents of shape "
        f"{tuple(latent)}; it needs at least {least:.2f} GiB ({MAX_SPLITS} chunks, streamed)"
    )
