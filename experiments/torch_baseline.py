"""A PyTorch SD ResNet-18 (CIFAR form) and its train step, written for `bench_train_step --baseline=torch`.

The network and the SD layers follow the authors' PyTorch code (VITA-Group/SmartDeal,
`SmartDeal-Training/models/resnet_se_mask.py`, `se/conv_mask.py`, `se/linear_mask.py`): NCHW,
3x3 stem without max-pool, basic blocks 64-128-256-512 with 1x1 conv + batch norm shortcuts, global
average pool, and every conv and the classifier an SD layer whose kernel is rebuilt every forward
pass as `bmm(q(C) * mask, B)` with q the sparsify-and-nearest-power-of-two quantizer and a
straight-through gradient (C a latent float, the authors' default `--switch` off). The blocking is
sd_jax's (`sd_jax.core.blocking.block_spec`, the same as the authors'), so both sides rebuild the
same number and shapes of blocks. q also clips to `max_coeff`, as sd_jax's latent layers do.

The step is the authors' loop body: zero the gradients, forward, cross-entropy, backward, SGD with
momentum 0.9 and weight decay 5e-4 on every parameter (B, C, batch norm, biases).

torch is optional (`requirements-bench.txt`); `available()` says whether it can be imported, and
nothing here imports it at module load.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from typing import Any

import numpy as np

from sd_jax.core import blocking
from sd_jax.core.decompose import DecomposeOptions

MODELS = ("resnet18",)
RESNET18_STAGES = (2, 2, 2, 2)
WIDTHS = (64, 128, 256, 512)


def available() -> bool:
    """Whether torch can be imported here."""
    return importlib.util.find_spec("torch") is not None


def _spec(shape: tuple[int, ...], kind: str) -> blocking.BlockSpec:
    options = DecomposeOptions()
    return blocking.block_spec(shape, kind, group_size=options.group_size, row_length=options.row_length,
                               max_rows=options.max_rows)


def quantize(c: Any, threshold: float, max_coeff: float) -> Any:
    """sd_jax's `pow2.quantize_pow2` in torch: 0 below `threshold`, clip to `max_coeff`, nearest power of
    two (a tie goes down); the authors' `sparsify_and_nearestpow2` without the clip."""
    import torch

    magnitude = c.abs().clamp(max=max_coeff)
    upper = torch.exp2(torch.ceil(torch.log2(magnitude)))
    lower = upper / 2
    rounded = torch.where(magnitude - lower <= upper - magnitude, lower, upper)
    return torch.where(c.abs() < threshold, torch.zeros_like(c), rounded * c.sign())


@functools.cache
def _straight_through() -> Any:
    import torch

    class QuantizeSTE(torch.autograd.Function):
        """`quantize` forward; the gradient passes through unchanged, as in the authors' layers."""

        @staticmethod
        def forward(ctx, c, threshold, max_coeff):
            return quantize(c, threshold, max_coeff)

        @staticmethod
        def backward(ctx, grad):
            return grad, None, None

    return QuantizeSTE


def quantize_ste(c: Any, threshold: float, max_coeff: float) -> Any:
    """`quantize` with a straight-through (identity) gradient."""
    return _straight_through().apply(c, threshold, max_coeff)


def rebuild(coeff: Any, basis: Any, mask: Any, shape: tuple[int, ...], threshold: float, max_coeff: float) -> Any:
    """The torch kernel of `shape` ((cout, cin, kh, kw) or (dout, din)) from blocks C (n, m, k), B (n, k, k):
    bmm(q(C) * mask, B) reshaped per output and the padding dropped, as the authors' `get_weight`."""
    import torch

    blocks = torch.bmm(quantize_ste(coeff, threshold, max_coeff) * mask, basis)
    return blocks.reshape(shape[0], -1, *shape[2:])[:, :shape[1]]


def build(name: str, num_classes: int, *, threshold: float = DecomposeOptions.threshold,
          max_coeff: float = DecomposeOptions.max_coeff, seed: int = 0) -> Any:
    """The PyTorch SD network `name` (one of MODELS), seeded, in training mode."""
    if name not in MODELS:
        raise ValueError(f"torch baseline: no PyTorch port of model {name!r}; pass one of {MODELS}")
    import torch
    from torch import nn
    import torch.nn.functional as F

    class SDKernel(nn.Module):
        """C (n, m, k), B (n, k, k) and the fixed mask of one kernel; `weight()` rebuilds it."""

        def __init__(self, shape: tuple[int, ...], spec: blocking.BlockSpec):
            super().__init__()
            self.shape, self.spec = shape, spec
            n, m, k = spec.block_shape
            coeff = torch.empty(n, m, k)
            nn.init.kaiming_normal_(coeff, mode="fan_out", nonlinearity="relu")
            self.C = nn.Parameter(coeff)
            self.B = nn.Parameter(torch.randn(n, k, k) / math.sqrt(k))
            real = torch.from_numpy(np.tile(blocking.real_rows(spec), (spec.num_outputs, 1)))[:, :, None]
            self.register_buffer("mask", (real & (quantize(coeff, threshold, max_coeff) != 0)).float())

        def weight(self):
            return rebuild(self.C, self.B, self.mask, self.shape, threshold, max_coeff)

    class SDConv2d(nn.Module):
        def __init__(self, cin: int, cout: int, kernel: int, stride: int):
            super().__init__()
            self.stride, self.padding = stride, kernel // 2
            self.kernel = SDKernel((cout, cin, kernel, kernel), _spec((kernel, kernel, cin, cout), "conv"))

        def forward(self, x):
            return F.conv2d(x, self.kernel.weight(), None, self.stride, self.padding)

    class SDLinear(nn.Module):
        def __init__(self, din: int, dout: int):
            super().__init__()
            self.kernel = SDKernel((dout, din), _spec((din, dout), "dense"))
            self.bias = nn.Parameter(torch.zeros(dout))

        def forward(self, x):
            return F.linear(x, self.kernel.weight(), self.bias)

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, width: int, stride: int):
            super().__init__()
            self.conv1, self.bn1 = SDConv2d(cin, width, 3, stride), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = SDConv2d(width, width, 3, 1), nn.BatchNorm2d(width)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != width:
                self.shortcut = nn.Sequential(SDConv2d(cin, width, 1, stride), nn.BatchNorm2d(width))

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = SDConv2d(3, 64, 3, 1), nn.BatchNorm2d(64)
            blocks, cin = [], 64
            for stage, (width, count) in enumerate(zip(WIDTHS, RESNET18_STAGES)):
                for b in range(count):
                    blocks.append(BasicBlock(cin, width, 2 if stage > 0 and b == 0 else 1))
                    cin = width
            self.blocks = nn.Sequential(*blocks)
            self.head = SDLinear(cin, num_classes)

        def forward(self, x):
            x = self.blocks(F.relu(self.bn(self.stem(x))))
            return self.head(x.mean(dim=(2, 3)))

    torch.manual_seed(seed)
    return ResNet().train()


class TorchStep:
    """The authors' train step on one fixed batch (NHWC float32 images, int labels, NumPy)."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, num_classes: int, lr: float):
        import torch

        self.torch = torch
        self.model = build(name, num_classes)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(np.asarray(labels, np.int64))
        self.loss = float("nan")

    def step(self) -> float:
        """One SGD step; returns the loss (a Python float, so the step has finished)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
        loss.backward()
        self.optimizer.step()
        self.loss = loss.item()
        return self.loss

    def describe(self) -> dict[str, Any]:
        """The torch version and its intra-op thread count, for the benchmark's record."""
        return {"torch": self.torch.__version__, "torch_threads": self.torch.get_num_threads()}
