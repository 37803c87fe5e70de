"""A straightforward reimplementation of the original mr-recon-tracer method, the baseline that
recon_fast.ReconTracer must reproduce: copy each hooked output to the host, then one .item() per
token per metric on batch item 0. Written for the tests and benchmarks, not shipped."""

from __future__ import annotations

import json
from datetime import datetime

import torch


def first_tensor(obj):
    if torch.is_tensor(obj):
        return obj
    if isinstance(obj, (list, tuple)):
        return next((x for x in obj if torch.is_tensor(x)), None)
    return getattr(obj, "last_hidden_state", None)


METRICS = {
    "energy": lambda t: t.norm().item(),
    "mean_activation": lambda t: t.mean().item(),
    "std_activation": lambda t: t.std().item(),
}


class OriginalReconTracer:
    def __init__(self, model, metric_funcs=None, include_raw_tensors=False):
        self.model = model
        self.hooks = []
        self.metric_funcs = metric_funcs or METRICS
        self.include_raw_tensors = include_raw_tensors
        self.activity_cube = {"meta": {}, "tokens": [], "layers": [], "provenance": {}}

    def _hook(self, name):
        def fn(module, inputs, output):
            t = first_tensor(output)
            if t is None:
                return
            hidden = t.detach().cpu()
            layer = {
                "layer_index": len(self.activity_cube["layers"]),
                "layer_name": name,
                "core_metrics": {
                    metric: [func(hidden[0, i, :]) for i in range(hidden.size(1))]
                    for metric, func in self.metric_funcs.items()
                },
            }
            if self.include_raw_tensors:
                layer["raw_tensors"] = {"hidden_states": hidden.tolist()}
            self.activity_cube["layers"].append(layer)

        return fn

    def add_hooks_all(self, filter_fn=None):
        for name, module in self.model.named_modules():
            if not name:
                continue
            keep = filter_fn(name, module) if filter_fn else any(p.requires_grad for p in module.parameters())
            if keep:
                self.hooks.append(module.register_forward_hook(self._hook(name)))

    def run(self, input_ids, **kwargs):
        self.activity_cube["meta"] = {"model_name": type(self.model).__name__,
                                      "timestamp": datetime.now().isoformat(),
                                      "input_shape": list(input_ids.shape)}
        self.activity_cube["tokens"] = [str(x) for x in input_ids[0].tolist()]
        with torch.no_grad():
            out = self.model(input_ids, output_attentions=True, output_hidden_states=True, return_dict=True, **kwargs)
        for i, att in enumerate(getattr(out, "attentions", None) or ()):
            if torch.is_tensor(att):
                self.activity_cube["layers"].append({"layer_index": i, "layer_name": f"attention.{i}",
                                                     "attention_scores": att.detach().cpu().tolist()})
        return out

    def export_json(self, path):
        with open(path, "w") as f:
            json.dump(self.activity_cube, f, indent=2)

    def clear_hooks(self):
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
