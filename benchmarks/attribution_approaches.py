"""The ways of getting direct logit attribution at the last token that bench_attribution.py
compares, on a random-weight model of SmolLM2-135M's shape (Llama, 30 layers, d_model 576):

  forward only         the model's forward pass, nothing kept (the floor)
  recon_fast           recon_fast.direct_logit_attribution: rows at one position only
  recon_fast per-head  the same, split into heads
  recon_fast per-neuron  the same, every MLP split into its 1536 hidden neurons
  recon_fast by-source   the same, every head split over the T source positions it read from
                       (the attention row of the last query only, recomputed from q and k)
  recon_fast by-source top-8  the same, each head keeping its 8 largest sources and one remainder
  cache components     hooks keep every component's whole [T, d_model] output, then decompose
                       (what an activation cache does, restricted to what DLA needs)
  TransformerLens      run_with_cache + decompose_resid + apply_ln_to_stack on a TransformerBridge

Run as a script (`python attribution_approaches.py APPROACH TOKENS`) it prints the peak resident
memory growth of one call in a fresh process, so that measurements do not share a heap. Run it
with MALLOC_MMAP_THRESHOLD_ set (bench_attribution.py does): glibc then maps every large buffer
and unmaps it when freed, instead of recycling earlier frees, which would hide part of a peak.
"""

from __future__ import annotations

import copy
import sys
import tempfile

import torch

import resident_memory

APPROACHES = ["forward only", "recon_fast", "recon_fast per-head", "recon_fast per-neuron", "recon_fast by-source",
              "recon_fast by-source top-8", "cache components", "TransformerLens"]
VOCAB = 49152


def smollm2_shaped_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def token_ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def cache_components(model, ids: torch.Tensor) -> torch.Tensor:
    """Keep every component's full output, then decompose the last position: [terms] float64."""
    from recon_fast.attribution.anatomy import anatomy
    from recon_fast.trace.session import extract_tensor

    parts = anatomy(model)
    cache: dict[str, torch.Tensor] = {}
    modules = {"embed": parts.embed} if parts.embed is not None else {}
    for i, block in enumerate(parts.blocks):
        modules[f"L{i}.attn"], modules[f"L{i}.mlp"] = block.attn, block.mlp
    handles = [module.register_forward_hook(
        lambda mod, args, out, name=name: cache.__setitem__(name, extract_tensor(out).detach().clone()))
        for name, module in modules.items()]
    if parts.embed is None:  # the adapter's embedding term is what enters block 0 (it runs first)
        handles.append(parts.blocks[0].module.register_forward_pre_hook(
            lambda mod, args, kwargs: cache.__setitem__(
                "embed", (args[0] if args else kwargs["hidden_states"]).detach().clone()), with_kwargs=True))
    handles.append(parts.final_norm.module.register_forward_pre_hook(
        lambda mod, args: cache.__setitem__("final", args[0].detach().clone())))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        target = int(logits[0, -1].argmax())
        h = cache.pop("final")[0, -1].double()
        scale = (h.pow(2).mean() + parts.final_norm.eps).sqrt()
        direction = parts.unembed.weight[target].double() * parts.final_norm.weight.double()
        return torch.stack([(v[0, -1].double() * direction).sum() / scale for v in cache.values()])


class TransformerLensApproach:
    """A TransformerBridge around the same model (built once, outside the timing)."""

    def __init__(self, model):
        import transformer_lens.model_bridge.sources.transformers  # noqa: F401  (boot_transformers)
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        folder = tempfile.mkdtemp(prefix="recon_fast_bench_tokenizer")
        PreTrainedTokenizerFast(tokenizer_object=core, bos_token="t0", eos_token="t0", unk_token="t1",
                                pad_token="t0").save_pretrained(folder)
        # A copy: booting switches the model to eager attention, which would slow the others.
        self.bridge = TransformerBridge.boot_transformers("llama", hf_model=copy.deepcopy(model),
                                                          tokenizer=AutoTokenizer.from_pretrained(folder))

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits, cache = self.bridge.run_with_cache(ids)
            target = int(logits[0, -1].argmax())
            stack = cache.decompose_resid(layer=-1, pos_slice=-1)
            scaled = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
            return scaled[:, 0] @ self.bridge.tokens_to_residual_directions(target)


def approach(name: str, model):
    """A callable ids -> result for one of APPROACHES."""
    from recon_fast.attribution import direct_logit_attribution

    if name == "forward only":
        def forward(ids):
            with torch.no_grad():
                return model(ids).logits
        return forward
    if name == "recon_fast":
        return lambda ids: direct_logit_attribution(model, ids)
    if name == "recon_fast per-head":
        return lambda ids: direct_logit_attribution(model, ids, per_head=True)
    if name == "recon_fast per-neuron":
        return lambda ids: direct_logit_attribution(model, ids, per_neuron=True)
    if name == "recon_fast by-source":
        return lambda ids: direct_logit_attribution(model, ids, by_source=True)
    if name == "recon_fast by-source top-8":
        return lambda ids: direct_logit_attribution(model, ids, by_source=True, source_top_k=8)
    if name == "cache components":
        return lambda ids: cache_components(model, ids)
    if name == "TransformerLens":
        return TransformerLensApproach(model)
    raise ValueError(f"unknown approach {name!r}; one of {APPROACHES}")


def peak_growth(name: str, length: int) -> int:
    """Peak resident memory growth, in bytes, of one call at `length` tokens (after a short
    warm-up call, so that one-off allocations of the first call do not count)."""
    model = smollm2_shaped_model()
    run = approach(name, model)
    run(token_ids(16))
    ids = token_ids(length)
    before = resident_memory.reset_peak()
    run(ids)
    return resident_memory.peak() - before


if __name__ == "__main__":
    print(peak_growth(sys.argv[1], int(sys.argv[2])))
