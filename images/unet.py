"""A small U-Net for 28x28 images: the denoiser for --dataset mnist / fashion_mnist (and for a folder of
the user's own images: any size, 1 or 3 channels, as many classes as it has subfolders).

    x [B, 1, 28, 28] --conv--> 28x28 (C) --down--> 14x14 (2C) --down--> 7x7 (2C, attention)
                                  |                   |                     |
    out [B, 1, 28, 28] <--conv-- 28x28 <----up------ 14x14 <-----up------ 7x7

Each upsampling returns to the size of the skip it meets: any size works (30 -> 15 -> 8 -> 15 -> 30).

Each level has `depth` residual blocks (GroupNorm, SiLU, 3x3 conv, twice), each adding a
projection of the sinusoidal time embedding (and of the class embedding, when there is one)
between its two convolutions. The decoder concatenates the encoder's features (skips).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from positional_embeddings import SeveralTimes, SinusoidalEmbedding


def norm(channels):
    return nn.GroupNorm(min(8, channels // 4), channels)


class ResBlock(nn.Module):
    def __init__(self, in_ch, out_ch, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2, self.conv2 = norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):  # x [B, in, H, W], emb [B, E] -> [B, out, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    def __init__(self, channels, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):  # [B, C, H, W] -> [B, C, H, W]
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    def __init__(self, channels=32, channel_mult=(1, 2, 2), depth=1, attention=True,
                 num_classes=None, in_channels=1, time_inputs=1):
        super().__init__()
        C, emb_dim = channels, 4 * channels
        self.channels = C
        self.num_classes = num_classes
        self.null_label = num_classes  # the extra "no label" class of classifier-free guidance
        self.time_embedding = SinusoidalEmbedding(C, endpoint=False)  # no weights: not in the state_dict
        if time_inputs > 1:  # MeanFlow's (t, t - r): each embedded, side by side
            self.time_embedding = SeveralTimes([SinusoidalEmbedding(C, endpoint=False) for _ in range(time_inputs)])
        self.time_mlp = nn.Sequential(nn.Linear(self.time_embedding.output_size, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        widths = [C * m for m in channel_mult]  # per level: 28x28, 14x14, 7x7

        self.stem = nn.Conv2d(in_channels, C, 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skip_widths, ch = [C], C
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(depth):
                blocks.append(ResBlock(ch, width, emb_dim))
                ch = width
                skip_widths.append(ch)
            self.down.append(blocks)
            if level < len(widths) - 1:  # stride-2 conv: 28 -> 14 -> 7
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_widths.append(ch)
        self.mid1 = ResBlock(ch, ch, emb_dim)
        self.attention = SelfAttention(ch) if attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, emb_dim)

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            blocks = nn.ModuleList()
            for _ in range(depth + 1):  # one more: also takes the skip of the downsampling
                blocks.append(ResBlock(ch + skip_widths.pop(), width, emb_dim))
                ch = width
            self.up.append(blocks)
            if level > 0:  # nearest-neighbour x2 then a conv: 7 -> 14 -> 28
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.head = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x, t, y=None):  # x [B, C, H, W], t [B] (MeanFlow: [B, 2]), y [B] or None -> [B, C, H, W]
        emb = self.time_mlp(self.time_embedding(t))  # [B, E]
        if self.class_emb is not None:
            if y is None:
                y = torch.full(t.shape[:1], self.null_label, device=t.device, dtype=torch.long)
            emb = emb + self.class_emb(y)
        h = self.stem(x)
        skips = [h]
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                skips.append(h)
        h = self.mid2(self.attention(self.mid1(h, emb)), emb)
        for level, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if level < len(self.upsample):  # nearest-neighbour to the next skip's size: x2, or x2 - 1 after odd
                h = self.upsample[level](F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        return self.head(h)


def build_unet(config):
    """The U-Net a config describes (flags --unet_channels, --unet_depth, --unet_attention)."""
    # Denormal floats (|x| < 1e-38) appear in the activations and gradients as training goes
    # on and slow x86 CPUs down several times (docs/speed.md); flushing them changes no result.
    torch.set_flush_denormal(True)
    return UNet(channels=config.get("unet_channels", 32), channel_mult=tuple(config.get("unet_mult", (1, 2, 2))),
                depth=config.get("unet_depth", 1), attention=config.get("unet_attention") is not False,
                num_classes=len(config.get("class_names") or range(10)) if config.get("class_conditional") else None,
                in_channels=config.get("channels") or 1,  # MNIST: 10 classes, 1 channel; a folder: its own
                time_inputs=config.get("time_inputs", 1))
