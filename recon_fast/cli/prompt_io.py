"""What each prompt of a command becomes: its token ids (as text, or as a user turn of the
tokenizer's chat template) and its output file (one per prompt)."""

from __future__ import annotations

from recon_fast.cube import export


def output_paths(out: str, count: int) -> list[str]:
    """One file per prompt: `out` itself for one, else cube-1.json, cube-2.json ... beside it."""
    if count == 1:
        return [out]
    suffix = next(s for s in export.SUFFIXES if out.lower().endswith(s))
    base = out[: len(out) - len(suffix)]
    return [f"{base}-{i}{out[len(base):]}" for i in range(1, count + 1)]


def encode(tokenizer, prompt: str, chat: bool):
    """The prompt's token ids: as text, or as a user turn of the tokenizer's chat template."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_dict=True, return_tensors="pt")
