"""Small random-weight models built from configs, one per architecture family the tracer must
handle, and an independent way to see what their modules output (plain torch hooks)."""

from __future__ import annotations

import contextlib

import torch
from original_recon_trace import first_tensor  # the original tool's rule, written once for the tests
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 96


def make_model(arch: str, *, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "attn_implementation": attn_implementation}
    if arch == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=48, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0, **common)
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                             pad_token_id=0, **common)
        model = LlamaForCausalLM(config)
    elif arch in ("neox", "neox-sequential"):
        config = GPTNeoXConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                               max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                               use_parallel_residual=arch == "neox", **common)
        model = GPTNeoXForCausalLM(config)
    elif arch in LLAMA_LIKE:
        config_class, model_class = LLAMA_LIKE[arch]
        config = config_class(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=12, max_position_embeddings=128, bos_token_id=0,
                              eos_token_id=0, pad_token_id=0, **common)
        model = model_class(config)
    elif arch == "bert":
        config = BertConfig(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                            max_position_embeddings=128, **common)
        model = BertModel(config)
    else:
        raise ValueError(arch)
    return model.eval()


ARCHS = ["gpt2", "llama", "neox", "bert"]
LLAMA_LIKE = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
              "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
# Causal LMs that direct logit attribution has adapters for (GPT-NeoX with both residual layouts).
CAUSAL_ARCHS = ["gpt2", "llama", "neox", "neox-sequential", *LLAMA_LIKE]


def perturb_vectors(model: torch.nn.Module, seed: int = 1, scale: float = 0.5) -> torch.nn.Module:
    """Random norm weights and biases: freshly built models have weight 1 and bias 0, under which
    a forgotten norm weight or bias term would go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def tracer_hooks_on(model: torch.nn.Module) -> int:
    """The hooks on model's modules, either kind: forward hooks, and Tracer hooks parked as a
    module's forward (recon_fast.trace.module_hooks: a TracedForward that still records)."""
    from recon_fast.trace.module_hooks import TracedForward

    parked = sum(1 for m in model.modules()
                 if TracedForward is not None and isinstance(m.__dict__.get("forward"), TracedForward)
                 and not m.__dict__["forward"].detached)
    return sum(len(m._forward_hooks) for m in model.modules()) + parked


@contextlib.contextmanager
def forward_hooks(pairs):
    """Plain forward hooks, one per (module, hook) pair, for the block's duration."""
    handles = [module.register_forward_hook(hook) for module, hook in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture_outputs(model: torch.nn.Module, names: list[str], call) -> list[tuple[str, torch.Tensor]]:
    """Runs call() with plain forward hooks on `names`; returns (name, output copy) in firing order."""
    modules = dict(model.named_modules())
    seen: list[tuple[str, torch.Tensor]] = []

    def hook_for(name):
        def hook(module, inputs, output):
            t = first_tensor(output)
            if t is not None:
                seen.append((name, t.detach().clone()))
        return hook

    with forward_hooks((modules[name], hook_for(name)) for name in names), torch.no_grad():
        call()
    return seen


def per_token_float64(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., 5] in float64: energy, mean, std (unbiased), min, max. Written out
    independently of recon_fast's own reference."""
    x = t.double()
    mean = x.mean(-1)
    centred = x - mean.unsqueeze(-1)
    std = (centred.pow(2).sum(-1) / (x.shape[-1] - 1)).sqrt()
    return torch.stack([x.pow(2).sum(-1).sqrt(), mean, std, x.amin(-1), x.amax(-1)], dim=-1)


# ---- models that are not decoder-only token models ------------------------------------------------
def make_t5(seed: int = 0) -> torch.nn.Module:
    """An encoder-decoder (T5): its decoder runs on a token axis of its own."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(config).eval()


def make_vit(seed: int = 0) -> torch.nn.Module:
    """A vision transformer: pixel_values in, [batch, patches + 1, d] activations."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=8, num_labels=3)
    return ViTForImageClassification(config).eval()


class SmallCNN(torch.nn.Module):
    """forward(x) on images [B, 3, 32, 32]: 4-D activations whose spatial size shrinks."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.conv2 = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.head = torch.nn.Linear(6, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


class SmallLSTM(torch.nn.Module):
    """forward(x) on float sequences [B, T, F]; the LSTM returns (output, (h, c))."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(7, 12)
        self.lstm = torch.nn.LSTM(12, 10, batch_first=True)
        self.out = torch.nn.Linear(10, 2)

    def forward(self, x):
        hidden, _ = self.lstm(self.inp(x))
        return self.out(hidden[:, -1])


def word_tokenizer(folder=None):
    """A word-level tokenizer over the tiny models' vocabulary ("t0 t5 t9"), with a chat template;
    saved to `folder` (and reloaded from it) when one is given."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="t0", eos_token="t0", unk_token="t1",
                                        pad_token="t0")
    tokenizer.chat_template = "{% for m in messages %}t2 {{ m['content'] }} t3 {% endfor %}{% if add_generation_prompt %}t4{% endif %}"
    if folder is None:
        return tokenizer
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def save_model_folder(folder, arch: str = "llama", model=None):
    """A local Hugging Face folder (config, weights, tokenizer) that recon_fast.models.load_model
    and `--model` read: a tiny random model of `arch` unless `model` is given."""
    model = model if model is not None else make_model(arch)
    model.save_pretrained(folder)
    word_tokenizer(folder)
    return folder


@torch.no_grad()
def residual_pieces(model: torch.nn.Module, ids, blocks, final_norm: torch.nn.Module, position: int, *,
                    attention_of=None, midpoint_of=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The residual stream's parts at `position`, taken with plain hooks (no recon_fast code), the
    attribution tests' independent reference: ({"embeddings", "L{i}.attn", "L{i}.mlp"} -> [B, d]
    float64, the final norm's input [B, d]). A block's attention write is the output of
    attention_of(block) (parallel blocks), else the residual entering midpoint_of(block) (the
    module between attention and MLP) minus the block's input; its MLP's the rest of the block."""
    seen, handles = {}, []

    def keep(key, output=False):
        def hook(module, args, out=None):
            value = (out[0] if isinstance(out, tuple) else out) if output else args[0]
            seen[key] = value[:, position].double()
        return hook

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(keep(f"pre{i}")))
        handles.append(block.register_forward_hook(keep(f"post{i}", output=True)))
        if attention_of is not None:
            handles.append(attention_of(block).register_forward_hook(keep(f"attn{i}", output=True)))
        else:
            handles.append(midpoint_of(block).register_forward_pre_hook(keep(f"mid{i}")))
    handles.append(final_norm.register_forward_pre_hook(keep("final")))
    try:
        model(ids)
    finally:
        for handle in handles:
            handle.remove()
    vectors = {"embeddings": seen["pre0"]}
    for i in range(len(blocks)):
        attn = seen[f"attn{i}"] if attention_of is not None else seen[f"mid{i}"] - seen[f"pre{i}"]
        vectors[f"L{i}.attn"] = attn
        vectors[f"L{i}.mlp"] = seen[f"post{i}"] - seen[f"pre{i}"] - attn
    return vectors, seen["final"]
