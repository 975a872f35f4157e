"""The backbone's BatchNorm layers as `model.norm` wants them (which stage does what: stages.py).

* ``freeze_batchnorm``: BatchNorm2d -> torchvision's FrozenBatchNorm2d (statistics and affine
  fixed buffers, the detection references' default for a pretrained backbone).
* ``sync_batchnorm``: BatchNorm -> statistics over every worker's batch: torch's SyncBatchNorm
  on GPUs. torch 2.14's ``nn.SyncBatchNorm`` works on GPU tensors only (on CPU the layer
  raises "SyncBatchNorm expected input tensor to be on GPU" and DDP refuses to wrap it), so CPU
  workers on gloo use ``CPUSyncBatchNorm``, which all-reduces the statistics itself.

Every mode keeps the state-dict keys of BatchNorm2d (FrozenBatchNorm2d drops only
``num_batches_tracked``, which BatchNorm2d fills in when it loads such a state), so
checkpoints move between modes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchvision.ops import FrozenBatchNorm2d


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm2d under `module` by a FrozenBatchNorm2d with its statistics; returns the count."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            state = next(iter(child.state_dict().values()), None)
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps).to(state.device if state is not None else "cpu")
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.track_running_stats:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
            count += 1
        else:
            count += freeze_batchnorm(child)
    return count


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient of each rank's input is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are all-reduced over the process group (gloo).

    Not an nn.SyncBatchNorm: torch rejects those on CPU, in the layer and again in DDP."""

    process_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        group = self.process_group or dist.group.WORLD
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        count = xf.new_tensor([x.numel() // c])
        total = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]), group)
        n = total[c]
        mean = total[:c] / n
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims), group) / n  # two passes: no cancellation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(var * n / (n - 1).clamp(min=1), alpha=m)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module) -> int:
    """Make every BatchNorm2d under `model` use the statistics of all workers, in place (same
    parameters, buffers and state-dict keys): torch's SyncBatchNorm on GPUs, CPUSyncBatchNorm
    on CPU. Returns the number of layers that now synchronise."""
    count = 0
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            if child.weight is not None and child.weight.device.type != "cpu":
                setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
            else:
                child.__class__ = CPUSyncBatchNorm  # adds behaviour only: same state, same keys
            count += 1
        else:
            count += sync_batchnorm(child)
    return count
