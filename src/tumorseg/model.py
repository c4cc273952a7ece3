"""The U-Net of the original implementation, built iteratively from `depth`, made safe.

Layout (identical to the original so that its checkpoint loads unchanged): one
`nn.Sequential` named `layers` holding, for depth D,
    [block, MaxPool2d(2)] * (D-1), bottleneck block,
    [ConvTranspose2d(k=2, s=2), block(2n -> n)] * (D-1), Conv2d(n, out, 1).
For D=4: 0,2,4 encoder blocks; 1,3,5 pools; 6 bottleneck; 7,9,11 up-convolutions;
8,10,12 decoder blocks; 13 the final 1x1 convolution.

Skip connections travel as in the original: a forward hook on each encoder block pushes
its output onto an activations stack, and a forward hook on each up-convolution pops the
newest entry and returns `cat((upsampled, skip), dim=1)`. Unlike the original, the stack
is not an attribute of the module: `forward` opens a fresh stack in a context variable
and closes it in `finally`, so an exception half-way cannot leave stale tensors behind,
and threads (each with its own context) never see each other's stack.
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from tumorseg.config import ModelConfig

_DEFAULT = ModelConfig()  # the original architecture: the defaults live there
# The state-dict key of the only weights that see the input channels.
FIRST_CONV = "layers.0.conv1.weight"

# The activations stack of the forward pass running in this thread/task (None outside one).
_ACTIVATIONS: contextvars.ContextVar[list[torch.Tensor] | None] = contextvars.ContextVar(
    "tumorseg_unet_activations", default=None
)


def _current_stack() -> list[torch.Tensor]:
    stack = _ACTIVATIONS.get()
    if stack is None:
        raise RuntimeError(
            "UNet skip-connection hook ran outside UNet.forward; call the model, not model.layers"
        )
    return stack


def _push_activation(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
    """Forward hook of encoder blocks: remember the output for the decoder."""
    _current_stack().append(output)


def _pop_and_concat(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
    """Forward hook of up-convolutions: concatenate the matching encoder output."""
    skip = _current_stack().pop()
    return torch.cat((output, skip), dim=1)


class Block(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU; (B, in, H, W) -> (B, out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


class UNet(nn.Module):
    """U-Net returning logits of shape (B, out_channels, H, W) for input (B, in_channels, H, W).

    Args:
        in_channels: input sequences (3 = pre-contrast, FLAIR, post-contrast).
        out_channels: output maps (1 for binary tumour segmentation).
        n_features: width of every level, as the original (used when `features` is None).
        depth: number of resolution levels including the bottleneck (>= 2).
        features: optional per-level widths (len == depth), e.g. (32, 64, 128, 256).

    Inputs whose H or W is not a multiple of 2**(depth-1) are zero-padded at the bottom
    and right and the output is cropped back, so any size >= 1 pixel is accepted.
    """

    def __init__(
        self,
        in_channels: int = _DEFAULT.in_channels,
        out_channels: int = _DEFAULT.out_channels,
        n_features: int = _DEFAULT.n_features,
        depth: int = _DEFAULT.depth,
        features: tuple[int, ...] | list[int] | None = _DEFAULT.features,
    ):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        if features is None:
            widths = [n_features] * depth
        else:
            widths = [int(f) for f in features]
            if len(widths) != depth:
                raise ValueError(f"features must have {depth} entries (one per level), got {widths}")
        if min(widths) < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError("channel counts must be >= 1")
        self.config = ModelConfig(
            in_channels=in_channels,
            out_channels=out_channels,
            n_features=n_features,
            depth=depth,
            features=tuple(widths) if features is not None else None,
        )

        layers: list[nn.Module] = []
        prev = in_channels
        for w in widths[:-1]:
            encoder = Block(prev, w)
            encoder.register_forward_hook(_push_activation)
            layers += [encoder, nn.MaxPool2d(2)]
            prev = w
        layers.append(Block(prev, widths[-1]))
        prev = widths[-1]
        for w in reversed(widths[:-1]):
            up = nn.ConvTranspose2d(prev, w, kernel_size=2, stride=2, bias=False)
            up.register_forward_hook(_pop_and_concat)
            # The decoder block reads its input width from the encoder level it joins.
            layers += [up, Block(2 * w, w)]
            prev = w
        layers.append(nn.Conv2d(prev, out_channels, kernel_size=1))
        self.layers = nn.Sequential(*layers)

    @property
    def divisor(self) -> int:
        """H and W are padded up to a multiple of this."""
        return 2 ** (self.config.depth - 1)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> UNet:
        return cls(cfg.in_channels, cfg.out_channels, cfg.n_features, cfg.depth, cfg.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected input of shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        m = self.divisor
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        token = _ACTIVATIONS.set([])
        try:
            out = self.layers(x)
        finally:
            _ACTIVATIONS.reset(token)
        if ph or pw:
            out = out[..., :h, :w]
        return out


class Ensemble(nn.Module):
    """Several U-Nets as one model: (B, C, H, W) -> logits (B, 1, H, W) of the mean of
    their probabilities (for `tumorseg.load_model` on an ensemble file; `Predictor`
    averages the members itself)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0)
        return torch.logit(p, eps=1e-6)
