"""Forward hooks that keep only the rows of chosen token positions of a module's input or output
([batch, positions, features] copies), so that attribution never holds a whole [tokens, d_model]
activation per layer. Hooks live in a context manager and are removed whatever happens."""

from __future__ import annotations

import torch
from torch import nn

from recon_fast.trace.session import extract_tensor


class PositionCapture:
    """with PositionCapture(positions) as capture:
           capture.output_of("L0.mlp", block.mlp); capture.input_of("final", norm)
           model(**inputs)
       capture.rows("L0.mlp")  # [batch, len(positions), features]
    """

    def __init__(self, positions: torch.Tensor):
        self.positions = positions  # [P] long, absolute indices into the token axis
        self._rows: dict[str, torch.Tensor] = {}
        self._whole: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def output_of(self, key: str, module: nn.Module) -> None:
        def hook(mod, args, output):
            self._keep(key, extract_tensor(output), "output")

        self._handles.append(module.register_forward_hook(hook))

    def whole_output_of(self, key: str, module: nn.Module) -> None:
        """The module's whole output (for the unembedding, which already ran on the kept rows
        only when the model takes logits_to_keep)."""
        def hook(mod, args, output):
            if key in self._whole:
                raise RuntimeError(f"{key}: the module ran twice in one forward pass")
            self._whole[key] = extract_tensor(output).detach()

        self._handles.append(module.register_forward_hook(hook))

    def whole(self, key: str) -> torch.Tensor:
        if key not in self._whole:
            raise RuntimeError(f"{key}: its module did not run during the forward pass")
        return self._whole[key]

    def input_of(self, key: str, module: nn.Module) -> None:
        """The module's first positional input, or its `hidden_states` keyword."""
        def hook(mod, args, kwargs):
            value = args[0] if args else kwargs.get("hidden_states")
            self._keep(key, value if torch.is_tensor(value) else None, "input")

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _keep(self, key: str, tensor: torch.Tensor | None, what: str) -> None:
        if key in self._rows:
            raise RuntimeError(f"{key}: the module ran twice in one forward pass; attribution needs "
                               "one call per module (no generate(), no reused modules)")
        if tensor is None or tensor.dim() != 3:
            shape = None if tensor is None else tuple(tensor.shape)
            raise ValueError(f"{key}: expected a [batch, tokens, features] tensor as {what}, got {shape}")
        positions = self.positions.to(tensor.device)
        self._rows[key] = tensor.detach().index_select(1, positions)

    def rows(self, key: str) -> torch.Tensor:
        if key not in self._rows:
            raise RuntimeError(f"{key}: its module did not run during the forward pass (was the model "
                               "called with inputs_embeds, or is it not the model that was hooked?)")
        return self._rows[key]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "PositionCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
