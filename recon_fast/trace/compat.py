"""ReconTracer: a drop-in for the original `recon_trace.tracer.ReconTracer` (mr-recon-tracer).

Same constructor, methods and attributes, same layer names, order, keys and numbers (energy = L2
norm, mean, unbiased std per token of batch item 0), tokens as str(id), and `attention.{i}`
entries appended when the model returns attentions. The difference is speed: the default metrics run in the fused token_stats
kernel on the device, and values reach the host once after the forward pass instead of one
.item() per token per metric.

Deliberate differences, each where the original misbehaves: NaN/Inf are written as null (the
original wrote invalid JSON); exports are atomic; hooks are removed when the forward raises;
outputs with fewer than 3 dims (which made the original raise inside the forward) are skipped
and listed in `skipped`; `provenance` is filled in (see recon_fast.cube.provenance). The model is left as
found: attentions are asked for only where the attention implementation returns them (eager;
under sdpa the original got a warning and nothing), hidden states never (the original asked and
never used them), and the output-capturing hooks transformers installs for good when asked are
removed after each run (recon_fast.trace.model_state).
User `metric_funcs` (callables on one token's vector) run per token as before: the slow path.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable

import torch

from recon_fast.cube import export
from recon_fast.cube.provenance import model_provenance
from recon_fast.kernels.stats_tables import column_picker
from recon_fast.kernels.token_stats import STATS, token_stats
from recon_fast.trace import presets
from recon_fast.trace.model_state import ModelState, returns_attentions
from recon_fast.trace.model_inputs import forward_takes
from recon_fast.trace.session import extract_tensor

# The original's three metrics: their token_stats channels and their keys in core_metrics.
_ORIGINAL_METRICS = ("energy", "mean", "std")
_DEFAULT_COLUMNS = column_picker([STATS.index(m) for m in _ORIGINAL_METRICS])  # taken at every hook
_DEFAULT_KEYS = tuple(export.METRIC_KEYS[m] for m in _ORIGINAL_METRICS)


class ReconTracer:
    def __init__(
        self,
        model: torch.nn.Module,
        metric_funcs: dict[str, Callable[[torch.Tensor], float]] | None = None,
        include_attention_details: bool = False,
        include_raw_tensors: bool = False,
    ):
        self.model = model
        self.hooks: list = []
        self._custom_metrics = metric_funcs is not None
        self.metric_funcs = metric_funcs or self._default_metrics()
        self.include_attention_details = include_attention_details
        self.include_raw_tensors = include_raw_tensors
        self._cube: dict[str, Any] = {"meta": {}, "tokens": [], "layers": [], "provenance": {}}
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        self.skipped: list[dict] = []

    @staticmethod
    def _default_metrics() -> dict[str, Callable[[torch.Tensor], float]]:
        # The original's definitions; only the custom-metric path calls them.
        return {
            "energy": lambda t: t.norm().item(),
            "mean_activation": lambda t: t.mean().item(),
            "std_activation": lambda t: t.std().item(),
        }

    @property
    def activity_cube(self) -> dict[str, Any]:
        """The cube as the original's dict; statistics still on the device are fetched first."""
        self._flush()
        return self._cube

    @activity_cube.setter
    def activity_cube(self, value: dict[str, Any]) -> None:
        self._pending.clear()
        self._cube = value

    # ---- hooks ------------------------------------------------------------------------------
    def _hook(self, layer_name: str):
        def fn(module, inputs, output):
            tensor = extract_tensor(output)
            if tensor is None:
                return
            if tensor.dim() < 3 or not tensor.is_floating_point():
                self.skipped.append({"layer_name": layer_name,
                                     "reason": f"activation {tuple(tensor.shape)} {tensor.dtype} is not a floating [batch, tokens, ...] tensor"})
                return
            hidden = tensor.detach()
            raw = hidden.clone() if self.include_raw_tensors else None
            if self._custom_metrics:
                self._flush()
                self._append_layer(layer_name, self._custom_token_metrics(hidden.cpu()), raw)
                return
            # The original reduces tensor[0, i, :] (all trailing dims) for every token i.
            rows = hidden[0].reshape(hidden.shape[1], -1)
            self._pending.append((layer_name, token_stats(rows)[:, _DEFAULT_COLUMNS], raw))

        return fn

    def _custom_token_metrics(self, hidden: torch.Tensor) -> dict[str, list[float]]:
        return {name: [func(hidden[0, i, :]) for i in range(hidden.size(1))]
                for name, func in self.metric_funcs.items()}

    def _append_layer(self, name: str, metrics: dict[str, list[float]], raw: torch.Tensor | None) -> None:
        layer = {"layer_index": len(self._cube["layers"]), "layer_name": name, "core_metrics": metrics}
        if raw is not None:
            layer["raw_tensors"] = {"hidden_states": raw.cpu().tolist()}
        self._cube["layers"].append(layer)

    def _flush(self) -> None:
        """Moves pending device statistics into the cube, in firing order."""
        pending, self._pending = self._pending, []
        for name, stats, raw in pending:
            columns = stats.cpu().t().tolist()
            self._append_layer(name, dict(zip(_DEFAULT_KEYS, columns)), raw)

    def add_hook(self, layer_name: str) -> None:
        module = presets.resolve_module(self.model, layer_name)
        self.hooks.append(module.register_forward_hook(self._hook(layer_name)))

    def add_hooks_by_type(self, module_type: type) -> None:
        for name, module in self.model.named_modules():
            if isinstance(module, module_type):
                self.hooks.append(module.register_forward_hook(self._hook(name)))

    def add_hooks_all(self, filter_fn=None) -> None:
        for name in presets.select_all(self.model, filter_fn):
            self.add_hook(name)

    def clear_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()

    # ---- run and export ---------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, **model_kwargs):
        self._flush()
        self._cube["meta"] = {
            "model_name": self.model.__class__.__name__,
            "timestamp": datetime.now().isoformat(),
            "input_shape": list(input_ids.shape),
        }
        self._cube["tokens"] = [str(x) for x in input_ids[0].tolist()]
        self._cube["provenance"] = model_provenance(self.model)
        ask = {"output_attentions": True, "return_dict": True}
        if not forward_takes(self.model, *ask, or_kwargs=True):  # a plain nn.Module: call it as it is
            ask = {}
        elif not returns_attentions(self.model):  # sdpa/flash: asking only logs a warning
            ask = {"return_dict": True}
        state = ModelState(self.model)
        try:
            with torch.no_grad():
                output = self.model(input_ids, **ask, **model_kwargs)
        except BaseException:
            self._pending.clear()
            self.clear_hooks()
            raise
        finally:
            state.restore()  # transformers' output-capturing hooks, installed for good when asked
        self._flush()
        for layer_idx, attn in enumerate(getattr(output, "attentions", None) or ()):
            if isinstance(attn, torch.Tensor):
                self._cube["layers"].append({"layer_index": layer_idx, "layer_name": f"attention.{layer_idx}",
                                             "attention_scores": attn.detach().cpu().tolist()})
        return output

    def export_json(self, path: str) -> None:
        cube = self.activity_cube
        export.write_json(path, meta=cube["meta"], tokens=[cube["tokens"]], layers=cube["layers"],
                          provenance=cube["provenance"])
