"""A checkpoint's model with its tokenizer: text in, streamed text out (`ebt generate`).

`TextModel` wraps ebt.inference.generate with the tokenizer the checkpoint was trained with; eval/scoring.py's
`Scorer` extends it with log-likelihoods for `ebt eval --task` and the lm-eval adapter. The tensor parts (the
Thinking settings, keyed starts and seeds) are ebt/generation.py's.

Every generated text starts a document: the prompt follows the end-of-document token, which is what precedes
every document but the first in the packed training stream (there is no BOS in training).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ebt.generation import Thinking, prompt_seed

REPLACEMENT = "\ufffd"  # what SentencePiece decodes an incomplete UTF-8 byte sequence to


class TextStream:
    """Incremental decoding: each new token's text as soon as it is complete (a character split over several
    byte-fallback tokens is held back until its last byte arrives)."""

    def __init__(self, decode: Callable[[list[int]], str], on_text: Callable[[str], None] | None = None) -> None:
        self.decode, self.on_text = decode, on_text
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        complete = text.rstrip(REPLACEMENT)
        new = complete[len(self.emitted):] if complete.startswith(self.emitted) else ""
        if new:
            self.emitted += new
            if self.on_text is not None:
                self.on_text(new)
        return new

    @property
    def text(self) -> str:
        return self.decode(self.ids)


class TextModel:
    """A model (EBT or Transformer++), its config and the tokenizer dir it was trained with."""

    def __init__(self, model, model_cfg, tokenizer_dir: str, thinking: Thinking | None = None) -> None:
        from data_pipeline.tokenizer import load_meta, load_processor

        self.model, self.cfg = model.eval(), model_cfg
        self.thinking = thinking or Thinking()
        self.thinking.validate()
        self.tokenizer_dir = tokenizer_dir
        self.processor = load_processor(tokenizer_dir)
        self.eos_id = load_meta(tokenizer_dir).eos_id
        self.is_ebt = model_cfg.kind == "ebt"
        self.steps = self.thinking.steps_for(model_cfg)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        return self.cfg.architecture.context_length

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(list(ids))

    def generate(self, context: list[int], max_new_tokens: int, *, until: Sequence[str] = (),
                 temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
                 on_text: Callable[[str], None] | None = None) -> tuple[str, int]:
        """Continue a context: (the text up to the first `until` string or the end of the document, tokens
        generated). When the context and max_new_tokens do not fit the model's window, the generation budget
        shrinks first, down to what leaves the context half of the window, then the context is cut from the
        left. on_text receives each piece of text as soon as it is decoded (streaming). seed: of the EBT's starts
        (ebt/starts.py: keyed by (seed, chain, the text so far)) and of sampling; None: thinking.seed for the
        starts, and sampling keyed by (thinking.seed, the prompt's tokens), so a prompt's answer does not depend
        on which requests came before it."""
        from ebt.inference import generate

        c = self.context_length
        prompt = [self.eos_id, *context]
        max_new_tokens = max(1, min(max_new_tokens, c - min(len(prompt), c // 2)))
        prompt = prompt[-(c - max_new_tokens):]
        stream = TextStream(self.decode)
        stops = [s for s in until if s]
        count = shown = 0

        def on_token(token: torch.Tensor) -> bool:
            nonlocal count, shown
            count += 1
            if int(token[0]) == self.eos_id:
                return True
            stream.add(int(token[0]))
            visible = _before_stop(stream.emitted, stops)
            if on_text is not None and len(visible) > shown:
                on_text(visible[shown:])
                shown = len(visible)
            return any(stop in stream.emitted for stop in stops)

        start_seed = self.thinking.seed if seed is None else seed
        sampling_seed = prompt_seed(prompt, self.thinking.seed) if seed is None else seed
        generator = torch.Generator(device=self.device).manual_seed(sampling_seed)
        generate(self.model, torch.tensor([prompt], device=self.device), max_new_tokens,
                 steps=self.steps if self.is_ebt else None, samples=self.thinking.samples,
                 selection=self.thinking.selection, temperature=temperature, top_p=top_p, generator=generator,
                 seed=start_seed, on_token=on_token)
        text = _before_stop(stream.text, stops)
        if on_text is not None and len(text) > shown:  # bytes of a character the budget cut off, as decoded
            on_text(text[shown:])
        return text, count


def _before_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]
