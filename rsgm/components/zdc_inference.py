"""An inference form of :class:`~rsgm.components.gan.ZDCGenerator` that computes the same
function with fewer operations and less memory traffic (eval mode only).

Three exact rewrites (equal up to float rounding; tests/test_zdc_inference.py):

* **BatchNorm folded** into the preceding Linear / Conv2d (eval mode uses the running
  statistics, so ``BN(W x + b) = (s W) x + s (b - mu) + beta`` with ``s = gamma / sqrt(var + eps)``);
  Dropout is the identity in eval mode and disappears.
* **Nearest upsampling by 2 followed by a 3x3 convolution as one stride-2 transposed
  convolution.** Output pixel ``(2a + p, 2b + q)`` of ``conv3x3(upsample2(x))`` only reads
  source rows ``a - 1 + p, a + p`` and columns ``b - 1 + q, b + q``, each with a sum of
  kernel taps: a 2x2 kernel per output phase, which a 4x4 transposed convolution of stride
  2 applies in one call (``transposed_weight``). It reads the small source instead of the
  4x larger upsampled tensor and does 4 instead of 9 multiply-adds per output pixel and
  channel pair. Upsamplings that are not exactly x2 (the proton's 40x20 -> 56x30) keep
  upsample + convolution.
* **Channels-last layout** for the convolutions (oneDNN's preferred layout on CPU: no
  reorder of every activation into and out of a blocked format).

Opt-in, not exact: ``dtype=torch.bfloat16`` runs the folded network in bfloat16 (weights
folded in float32, then rounded; output returned in float32), about 1.8x faster for the
compact generator on a CPU with AVX512-BF16, at about 3 significant digits
(docs/zdc.md gives the measured deviation).

The parameters are derived from the source generator and re-derived whenever one of its
parameters or buffers changed (their version counters, bumped by every optimiser step and
by BatchNorm's running-statistics update), so the form can be kept and compiled once.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` with ``BN_eval(W x + b) = W' x + b'`` (output channels on dim 0 of W)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    bias = torch.zeros_like(bn.running_mean) if bias is None else bias
    return weight * scale.view(-1, *[1] * (weight.dim() - 1)), bias * scale + shift


def transposed_weight(weight: torch.Tensor) -> torch.Tensor:
    """(I, O, 4, 4) kernel of the stride-2 transposed convolution equal to ``conv3x3(upsample2(x))``.

    Along one axis, output ``2a`` reads source ``a - 1`` with tap w0 and ``a`` with w1 + w2;
    output ``2a + 1`` reads ``a`` with w0 + w1 and ``a + 1`` with w2. A stride-2 transposed
    convolution with padding 1 sends source ``i`` to output ``2i + k - 1`` with tap ``k``, so
    its taps are ``(w2, w1 + w2, w0 + w1, w0)``.
    """
    def axis(w: torch.Tensor, dim: int) -> torch.Tensor:
        w0, w1, w2 = w.unbind(dim)
        return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)

    return axis(axis(weight, 2), 3).transpose(0, 1)


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``conv3x3(upsample2(x), padding=1)`` from a :func:`transposed_weight` kernel."""
    return F.conv_transpose2d(x, weight, bias, stride=2, padding=1)


class _Conv(nn.Module):
    """One folded convolution: a plain 3x3 (optionally after an upsampling that is not x2)
    or a stride-2 transposed one (upsampling x2 + 3x3), then LeakyReLU or Hardtanh."""

    def __init__(self, kind: str, size: tuple[int, int] | None, slope: float | None, clip: tuple[float, float] | None):
        super().__init__()
        self.kind, self.size, self.slope, self.clip = kind, size, slope, clip
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "transposed":
            x = upsample_conv(x, self.weight, self.bias)
        else:
            if self.size is not None:
                x = F.interpolate(x, size=self.size, mode="nearest")
            x = F.conv2d(x, self.weight, self.bias, padding=1)
        # In place: the convolution's output is a temporary, and writing a fresh activation
        # tensor costs more in page faults than the activation itself (measured in docs/zdc.md).
        if self.slope is not None:
            return F.leaky_relu(x, self.slope, inplace=True)
        return x.clamp_(*self.clip) if self.clip is not None else x


class FusedZDCGenerator(nn.Module):
    """The eval-mode function of a ``ZDCGenerator``, rewritten (see the module docstring).

    Holds no trainable state: ``refresh()`` re-derives its tensors from ``source`` when the
    source changed; call it before generating (outside ``torch.compile``), as
    :class:`~rsgm.components.gan.CompiledForInference` does.
    """

    def __init__(self, source: nn.Module, channels_last: bool = True, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.source_ref = [source]  # a list: not a registered submodule, so not in any state dict
        self.noise_dim, self.cond_dim, self.grid = source.noise_dim, source.cond_dim, source.grid
        self.channels_last, self.dtype = channels_last, dtype
        dense = [m for m in source.dense if isinstance(m, (nn.Linear, nn.BatchNorm1d, nn.LeakyReLU))]
        self.slopes = [m.negative_slope for m in dense if isinstance(m, nn.LeakyReLU)]
        self.linear_w = nn.ParameterList([nn.Parameter(torch.empty(0), requires_grad=False) for _ in range(2)])
        self.linear_b = nn.ParameterList([nn.Parameter(torch.empty(0), requires_grad=False) for _ in range(2)])
        self.convs = nn.ModuleList()
        self._plan: list[tuple[nn.Conv2d, nn.BatchNorm2d | None, bool]] = []
        size, in_hw, mods = None, source.grid[1:], list(source.convs)
        for i, m in enumerate(mods):
            if isinstance(m, nn.Upsample):
                size = tuple(m.size)
            elif isinstance(m, nn.Conv2d):
                bn = mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d) else None
                act = next(a for a in mods[i + 1:] if isinstance(a, (nn.LeakyReLU, nn.Hardtanh)))
                x2 = size is not None and tuple(size) == (2 * in_hw[0], 2 * in_hw[1])
                kind = "transposed" if x2 else "conv"
                slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else None
                clip = (act.min_val, act.max_val) if isinstance(act, nn.Hardtanh) else None
                self.convs.append(_Conv(kind, None if x2 else size, slope, clip))
                self._plan.append((m, bn, x2))
                in_hw = size if size is not None else in_hw
                size = None
        self._key: tuple | None = None
        self.refresh()

    def _source_key(self) -> tuple | None:
        tensors = (*self.source_ref[0].parameters(), *self.source_ref[0].buffers())
        if any(t.is_inference() for t in tensors):
            return None  # inference tensors keep no version counter: re-derive every time
        return tuple((t.data_ptr(), t._version) for t in tensors)

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-derive the folded tensors if the source generator changed since the last call."""
        key = self._source_key()
        if key is not None and key == self._key:
            return
        src = self.source_ref[0]
        layers = [m for m in src.dense if isinstance(m, (nn.Linear, nn.BatchNorm1d))]
        for j, (lin, bn) in enumerate(zip(layers[0::2], layers[1::2])):
            w, b = fold_batchnorm(lin.weight, lin.bias, bn)
            self.linear_w[j].data, self.linear_b[j].data = w.to(self.dtype, copy=True), b.to(self.dtype, copy=True)
        for conv, (src_conv, bn, x2) in zip(self.convs, self._plan):
            w, b = (src_conv.weight, src_conv.bias if src_conv.bias is not None else torch.zeros(src_conv.out_channels,
                                                                                                device=src_conv.weight.device))
            if bn is not None:
                w, b = fold_batchnorm(w, b, bn)
            w = (transposed_weight(w) if x2 else w).to(self.dtype, copy=True)
            conv.weight.data = w.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            conv.bias.data = b.to(self.dtype, copy=True)
        self._key = key

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, cond], dim=1).to(self.dtype)
        for w, b, slope in zip(self.linear_w, self.linear_b, self.slopes):
            h = F.leaky_relu(F.linear(h, w, b), slope, inplace=True)
        h = h.view(-1, *self.grid)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        for conv in self.convs:
            h = conv(h)
        return h.to(z.dtype).contiguous()
