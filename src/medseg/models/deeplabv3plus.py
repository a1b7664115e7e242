"""DeepLabV3+ (Chen et al. 2018, ECCV) with a ResNet-18/34/50 encoder written here (no torchvision).

Encoder: He et al. 2016 ResNet (7×7 stride-2 stem, max-pool, four stages; BasicBlock for 18/34,
Bottleneck for 50). Output stride 16 replaces the last stage's stride with dilation 2; output stride 8
also the third stage's (dilations 2 and 4), as in the paper. ASPP: 1×1, three 3×3 atrous branches
(rates 6/12/18 at OS 16, doubled at OS 8) and image pooling, concatenated and projected to 256.
Decoder: low-level stage-1 features (stride 4) reduced to 48 channels, concatenated with the 4×
upsampled ASPP output, two 3×3 convolutions of 256, 4× bilinear upsampling to the input size.
Pretrained ImageNet weights are not available offline: the encoder starts from He initialisation.
2D only; inputs must be divisible by the output stride so the two decoder paths align exactly.
``encoder="tu-<name>"`` (needs timm) uses a timm ``features_only`` backbone at the same output stride
instead: its stride-4 feature is the low-level input and its last feature feeds the ASPP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.models import MODELS
from medseg.models.blocks import InputSizeError, check_dims, check_input
from medseg.models.timm_encoder import TimmEncoder, timm_name


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = _bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _bn(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = _bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _bn(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = _bn(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


RESNETS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


class ResNetEncoder(nn.Module):
    """Returns (stride-4 low-level features, final features at the output stride)."""

    def __init__(self, in_channels: int, depth: int = 34, output_stride: int = 16, base: int = 64):
        super().__init__()
        block, layers = RESNETS[depth]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, base, 7, 2, 3, bias=False), _bn(base), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        strides = (1, 2, 2, 1) if output_stride == 16 else (1, 2, 1, 1)
        dilations = (1, 1, 1, 2) if output_stride == 16 else (1, 1, 2, 4)
        cin = base
        stages = []
        for i, (n, s, dil) in enumerate(zip(layers, strides, dilations)):
            width = base * 2**i
            blocks = []
            for j in range(n):
                # first block of a dilated stage uses the previous dilation (as in torchvision/DeepLab)
                d = dil if j > 0 or dil == 1 else max(dil // 2, 1)
                blocks.append(block(cin, width, s if j == 0 else 1, d))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.low_channels = base * block.expansion
        self.out_channels = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        low = x = self.stages[0](x)
        for s in self.stages[1:]:
            x = s(x)
        return low, x


def _cbr(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False), _bn(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates: tuple[int, int, int]):
        super().__init__()
        self.branches = nn.ModuleList([_cbr(cin, cout, 1)] + [_cbr(cin, cout, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), _bn(cout), nn.ReLU(inplace=True))
        self.proj = nn.Sequential(_cbr(5 * cout, cout, 1), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bilinear upsampling of a 1×1 map is a broadcast: expand is exact and exports cleanly
        pooled = self.pool(x).expand(-1, -1, x.shape[2], x.shape[3])
        return self.proj(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class TimmDeepLabEncoder(nn.Module):
    """A timm backbone answering like :class:`ResNetEncoder`: (stride-4 features, features at the output stride)."""

    def __init__(self, name: str, in_channels: int, output_stride: int, pretrained: bool = False):
        super().__init__()
        self.body = TimmEncoder(name, in_channels, output_stride=output_stride, pretrained=pretrained)
        red = self.body.reductions
        if 4 not in red or red[-1] != output_stride:
            raise MedsegError(
                f"timm encoder {name!r} gives feature strides {red}: DeepLabV3+ needs a stride-4 feature "
                f"and a last feature at output stride {output_stride}"
            )
        self.low_index = red.index(4)
        self.low_channels = self.body.channels[self.low_index]
        self.out_channels = self.body.channels[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x)
        return feats[self.low_index], feats[-1]


@MODELS.register("deeplabv3plus")
class DeepLabV3Plus(nn.Module):
    name = "deeplabv3plus"
    paper = "Chen et al. 2018, DeepLabV3+ (ECCV)"
    dims = (2,)
    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2, encoder_depth: int = 34,
                 output_stride: int = 16, encoder_base: int = 64, aspp_channels: int = 256, decoder_channels: int = 256,
                 encoder: str | None = None, encoder_pretrained: bool = False):
        super().__init__()
        check_dims(self.name, spatial_dims, self.dims)
        if output_stride not in (8, 16):
            raise MedsegError(f"deeplabv3plus output_stride must be 8 or 16, got {output_stride!r}")
        self.spatial_dims = 2
        self.in_channels = in_channels
        self.required_divisor = output_stride
        tname = timm_name(encoder, self.name)
        if tname is not None:
            self.encoder = TimmDeepLabEncoder(tname, in_channels, output_stride, encoder_pretrained)
        elif encoder_depth not in RESNETS:
            raise MedsegError(f"deeplabv3plus encoder_depth must be one of {sorted(RESNETS)}, got {encoder_depth!r}")
        else:
            self.encoder = ResNetEncoder(in_channels, encoder_depth, output_stride, encoder_base)
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.aspp = ASPP(self.encoder.out_channels, aspp_channels, rates)
        self.low = _cbr(self.encoder.low_channels, 48, 1)
        self.up4 = nn.Upsample(scale_factor=output_stride // 4, mode="bilinear", align_corners=False)
        self.decoder = nn.Sequential(_cbr(aspp_channels + 48, decoder_channels), _cbr(decoder_channels, decoder_channels))
        self.head = nn.Conv2d(decoder_channels, out_channels, 1)
        self.final_up = nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, 2, self.required_divisor, self.name, self.in_channels)
        if self.training and x.shape[0] < 2:
            # the ASPP image-pooling branch normalises one value per channel and image: BatchNorm needs two
            raise InputSizeError(f"{self.name} needs a batch of at least 2 in training, got {x.shape[0]}")
        low, high = self.encoder(x)
        y = torch.cat([self.up4(self.aspp(high)), self.low(low)], 1)
        return self.final_up(self.head(self.decoder(y)))
