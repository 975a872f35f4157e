"""What an adapter plug-in is: how it attaches to a backbone, runs with it, which parameters it owns
(those train in the adapt stage, where the backbone is frozen) and what it does when adapt ends."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn


class AdapterKind(abc.ABC):
    name: ClassVar[str]
    placement: ClassVar[str]  # where it sits, in words (`paf-ray inspect`)
    config: ClassVar[type | None] = None  # the dataclass of its section model.adapter.<name>
    # in adapt, the gradient of its parameters passes back through frozen backbone stages (so the
    # frozen backbone's forward must record autograd)
    graph_through_backbone: ClassVar[bool] = False
    adds_parameters: ClassVar[bool] = True  # False: the kind that leaves the backbone as it is (none)

    def check(self, section: Any) -> list[tuple[str, str]]:
        """(key, reason) problems of its section; checked once, at load."""
        return []

    @abc.abstractmethod
    def attach(self, backbone: nn.Module, entry, stages: list[int], section: Any) -> nn.Module:
        """Build the adapters for `stages` (1..4) of `backbone` (made by the registry `entry`); returns
        the module the model keeps as `adapters` (it may also change `backbone` in place)."""

    def features(self, backbone, adapters: nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The adapted backbone features {1..4} of a normalised input. `backbone(x, after_stage=None)`
        runs the backbone (without autograd where the stage policy says it needs none)."""
        return backbone(x)

    @abc.abstractmethod
    def owned(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters this adapter owns in `model` (they train in adapt)."""

    def finish(self, model: nn.Module) -> bool:
        """End of the adapt stage (when `merge_adapters`): fold the adapters into the plain network if it
        can; True if it did. Idempotent."""
        return False
