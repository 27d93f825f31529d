"""Networks that map auxiliary-channel Q-transform patches to the main channel's.

Input: (batch, n_aux, P, P); output: (batch, 1, P, P); P is a multiple of 4.

- ``decoder``: the small convolutional encoder/decoder of the Virgo glitch use
  case (about 0.3 M parameters at the default width).
- ``unet``: a two-level U-Net with skip connections, for users who want a
  stronger baseline at a few times the cost.
"""

from __future__ import annotations

import torch
from torch import nn

from virgo_exps.modelfile import load_model


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm rather than BatchNorm: its output does not depend on how a
    # global batch is split over processes, so every strategy and world size
    # computes the same function and their loss trajectories can be compared.
    return nn.GroupNorm(min(8, channels), channels)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        _norm(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        _norm(c_out),
        nn.ReLU(inplace=True),
    )


class ConvDecoder(nn.Module):
    """Encoder (two stride-2 convolutions) then a decoder of transposed convolutions."""

    def __init__(self, in_channels: int, width: int = 24):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            _block(in_channels, w),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            _block(2 * w, 2 * w),
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(4 * w, 2 * w, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            _block(2 * w, 2 * w),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class UNet(nn.Module):
    """Two down-sampling levels, skip connections, width doubling per level."""

    def __init__(self, in_channels: int, width: int = 16):
        super().__init__()
        w = width
        self.enc1 = _block(in_channels, w)
        self.enc2 = _block(w, 2 * w)
        self.mid = _block(2 * w, 4 * w)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = _block(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = _block(2 * w, w)
        self.head = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


def build_model(name: str, in_channels: int) -> nn.Module:
    """Build the network named by ``train.model``."""
    if name == "decoder":
        return ConvDecoder(in_channels)
    if name == "unet":
        return UNet(in_channels)
    raise ValueError(f"train.model: unknown model {name!r}; expected 'decoder' or 'unet'")


def build_from_file(path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The network saved in a model file (verified by :func:`virgo_exps.modelfile.load_model`), weights loaded."""
    payload = load_model(path, map_location)
    model = build_model(**payload["model_args"])
    model.load_state_dict(payload["model"])
    return model
