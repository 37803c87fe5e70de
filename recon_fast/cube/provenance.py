"""What produced a cube: package versions and the model's revision, for the JSON's `provenance`.

`commit_hash` records the model's weights revision: the Hugging Face hub commit the model was
loaded from (`config._commit_hash`) when known, else null. `model_config_sha256` fingerprints
the architecture (the config as JSON), which identifies random-weight and local models too.
ModelProvenance keeps one model's provenance while its config is unchanged.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import platform
from importlib import metadata

import torch
from torch import nn

from recon_fast._version import __version__

_PACKAGES = ("torch", "transformers", "recon-fast", "numpy", "orjson", "accelerate", "gguf")


@functools.lru_cache(maxsize=1)  # metadata lookups scan site-packages: tens of ms each
def _installed_versions() -> tuple[tuple[str, str], ...]:
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package.replace("-", "_")] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    versions["torch"] = torch.__version__
    # A source checkout built in place (no pip install) has no metadata: its own version then.
    versions.setdefault("recon_fast", __version__)
    return tuple(versions.items())


def package_versions() -> dict[str, str]:
    return dict(_installed_versions())


def model_provenance(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    commit = getattr(config, "_commit_hash", None) if config is not None else None
    provenance = {"commit_hash": commit, "package_versions": package_versions()}
    if config is not None and hasattr(config, "to_json_string"):
        # Where the model was loaded from is not its configuration: the same model saved and read
        # back, or moved, must keep its fingerprint (a profile compared with it would warn).
        fields = json.loads(config.to_json_string(use_diff=False))
        fields.pop("_name_or_path", None)
        text = json.dumps(fields, sort_keys=True)
        provenance["model_config_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        provenance["model_name_or_path"] = getattr(config, "_name_or_path", None) or None
    return provenance


class ModelProvenance:
    """model_provenance(model) of one model, as a Tracer asks for it after every run: worked out
    again only when the config changed (the fingerprint, the config as JSON through sha256, cost
    ~0.2 ms a run, a tenth of a host-bound forward). Staleness: the cached value is used only while
    `model.config` is the same object and its attributes (`__dict__`, which with its class is all
    to_dict reads) equal a deep copy taken when the value was worked out,
    nested dicts and sub-configs compared by value; a config that cannot be copied or compared is
    worked out every time. Each call returns a dict of its own."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._config = None
        self._state: dict | None = None  # deep copy of the config's __dict__ behind _value
        self._value: dict | None = None

    def __call__(self) -> dict:
        config = getattr(self.model, "config", None)
        value = self._value if self._unchanged(config) else None
        if value is None:
            value = self._value = model_provenance(self.model)
            self._config = config
            try:
                self._state = copy.deepcopy(config.__dict__) if config is not None else None
            except Exception:  # not copyable: never reused
                self._value = None
        return {**value, "package_versions": dict(value["package_versions"])}

    def _unchanged(self, config) -> bool:
        if self._value is None or config is not self._config:
            return False
        if config is None:
            return True
        try:
            return bool(config.__dict__ == self._state)
        except Exception:  # values that do not compare (tensors): work it out again
            return False
