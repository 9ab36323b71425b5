"""A checkpoint as a language model over text: log-likelihoods and generation, for an EBT and a Transformer++.

Both the downstream tasks (`ebt eval --task`, eval/tasks/) and the lm-evaluation-harness adapter
(eval/lm_eval_adapter.py) score through `Scorer`, so the two agree by construction.

Conventions:
- Every scored or generated text starts a document: it is preceded by the end-of-document token, which is what
  precedes every document but the first in the packed training stream (there is no BOS in training).
- A sequence longer than the context is cut from the left, keeping the tokens nearest to what is scored.
- For an EBT, the log-probability of token t+1 is the log-softmax of the thinking loop's final logits at
  position t (`model.think`), with `steps` steps and `samples` chains (kept per token by `selection`).
  Chain m at position t starts from logits keyed by (seed, m, the tokens 0..t it sees), so a position's
  prediction depends only on its visible prefix, like a causal LM's: the same prefix gets the same
  distribution in every request and batch, and a continuation's score does not depend on what follows it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

REPLACEMENT = "\ufffd"  # what SentencePiece decodes an incomplete UTF-8 byte sequence to


def check_device(option: str, name: str) -> str:
    """A --device value torch can use here, else a ValueError naming it (torch would raise a multi-line error
    from deep inside the model's .to())."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option} {name!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {name}: no CUDA device is available here (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return name


def system1_steps(model_cfg) -> int:
    """The thinking steps an EBT was trained to predict with: its landscapes, the last one repeated
    landscape_repeats more times, as the trainer's validation runs them."""
    return model_cfg.mcmc_steps + model_cfg.landscape_repeats


@dataclass(frozen=True)
class Thinking:
    """How an EBT predicts: thinking steps (None: the trained mcmc_steps), chains per token, their selection."""

    steps: int | None = None  # None: system1_steps
    samples: int = 1
    selection: str = "min"
    seed: int = 0

    def validate(self) -> None:
        from ebt.inference import SELECTIONS

        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
            raise ValueError(f"steps: must be an integer >= 0, got {self.steps!r}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples: must be an integer >= 1, got {self.samples!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection: unknown selection {self.selection!r}; expected one of "
                             f"{', '.join(SELECTIONS)}")


def prefix_keyed_starts(inputs: Sequence[int], seed: int, sample: int, vocab_size: int, std: float,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Initial logits [L, V] of chain `sample` for input tokens [L]: row t keyed by (seed, sample, inputs[:t+1])."""
    if std == 0:
        return torch.zeros(len(inputs), vocab_size, dtype=dtype)
    digest = hashlib.blake2b(digest_size=8, key=f"ebt-score:{seed}:{sample}".encode())
    rows = torch.empty(len(inputs), vocab_size, dtype=dtype)
    for position, token in enumerate(inputs):
        digest.update(int(token).to_bytes(4, "little"))
        generator = torch.Generator().manual_seed(int.from_bytes(digest.copy().digest(), "little") >> 1)
        torch.randn(vocab_size, generator=generator, dtype=dtype, out=rows[position])
    return rows.mul_(std)


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


class Scorer:
    def __init__(self, model, model_cfg, tokenizer_dir: str, thinking: Thinking | None = None,
                 batch_size: int = 8) -> None:
        from data_pipeline.tokenizer import load_meta, load_processor

        self.model, self.cfg = model.eval(), model_cfg
        self.thinking = thinking or Thinking()
        self.thinking.validate()
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.tokenizer_dir = tokenizer_dir
        self.processor = load_processor(tokenizer_dir)
        self.eos_id = load_meta(tokenizer_dir).eos_id
        self.is_ebt = model_cfg.kind == "ebt"
        self.steps = (self.thinking.steps if self.thinking.steps is not None else system1_steps(model_cfg)) \
            if self.is_ebt else 0

    @classmethod
    def load(cls, checkpoint: str | Path, *, tokenizer: str | None = None, thinking: Thinking | None = None,
             device: str = "cpu", batch_size: int = 8) -> Scorer:
        """From a run dir, checkpoint dir or export dir; the tokenizer is found as launch/run_tokenizer.py says."""
        from launch.checkpoint import load_model, resolve_checkpoint
        from launch.run_tokenizer import find_tokenizer

        path = resolve_checkpoint(checkpoint)
        model, cfg = load_model(path, device=device)
        found = find_tokenizer(path, tokenizer, model_vocab=cfg.vocab_size)
        scorer = cls(model, cfg, found, thinking, batch_size)
        scorer.checkpoint = path
        return scorer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    # ------------------------------------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(list(ids))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a context and its continuation as the whole text tokenizes (lm-eval's convention:
        trailing spaces of the context belong to the continuation, where the tokenizer puts a word's space)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        head = self.encode(context)
        if whole[:len(head)] == head:
            return head, whole[len(head):]
        return head, self.encode(continuation)  # a piece straddles the boundary: score the continuation alone

    # ------------------------------------------------------------------------------------------------ scores
    def loglikelihood(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation tokens | context), whether greedy decoding gives every one of them)."""
        items = []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("loglikelihood: empty continuation (nothing to score)")
            items.append(([self.eos_id, *context, *continuation], len(continuation)))
        return self.score(items)

    def rolling_loglikelihood(self, ids: list[int]) -> float:
        """log p(text) of a whole document, each token predicted once with as much context as fits (windows of
        the context length; a later window re-reads earlier tokens as context without scoring them again)."""
        full = [self.eos_id, *ids]
        c = self.context_length
        items = []
        for start in range(0, len(ids), c):
            end = min(start + c, len(ids))
            items.append((full[max(0, end - c):end + 1], end - start))
        return sum(logprob for logprob, _ in self.score(items)) if items else 0.0

    def score(self, items: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """For each (tokens, n): the summed log-probability of the last n tokens given those before them, and
        whether each is its position's argmax. Tokens are cut from the left to context_length + 1."""
        c = self.context_length
        prepared = []
        for tokens, n in items:
            tokens = list(tokens)[-(c + 1):]
            if len(tokens) < 2 or n < 1:
                raise ValueError("score: need at least one conditioning token and one scored token")
            prepared.append((tokens, min(n, len(tokens) - 1)))
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(prepared)
        for first in range(0, len(order), self.batch_size):
            chunk = order[first:first + self.batch_size]
            for index, result in zip(chunk, self._score_batch([prepared[i] for i in chunk]), strict=True):
                results[index] = result
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _score_batch(self, batch: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        width = max(len(tokens) for tokens, _ in batch) - 1
        # Right padding: every position sees only its own prefix, so padding after a row changes nothing in it.
        inputs = torch.full((len(batch), width), self.eos_id, dtype=torch.long)
        for row, (tokens, _) in enumerate(batch):
            inputs[row, :len(tokens) - 1] = torch.tensor(tokens[:-1])
        logprobs = torch.log_softmax(self._logits(inputs, [tokens[:-1] for tokens, _ in batch]).double(), dim=-1)
        out = []
        for row, (tokens, n) in enumerate(batch):
            length = len(tokens) - 1
            positions = torch.arange(length - n, length)
            targets = torch.tensor(tokens[length - n + 1:])
            rows = logprobs[row, positions]
            out.append((float(rows.gather(1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())))
        return out

    def _logits(self, inputs: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
        """Final logits [B, S, V] for inputs [B, S] (rows: each row's real tokens, for the EBT's starts)."""
        device = self.device
        if not self.is_ebt:
            logits, _ = self.model.logits(inputs.to(device))
            return logits.float().cpu()
        cfg, think = self.cfg, self.thinking
        dtype = self.model.alpha_raw.dtype
        starts = torch.zeros(inputs.shape[0], think.samples, inputs.shape[1], cfg.vocab_size, dtype=dtype)
        for row, tokens in enumerate(rows):
            for sample in range(think.samples):
                starts[row, sample, :len(tokens)] = prefix_keyed_starts(tokens, think.seed, sample, cfg.vocab_size,
                                                                        cfg.init_logit_std, dtype)
        result = self.model.think(inputs.to(device), self.steps, think.samples, think.selection,
                                  starts=starts.to(device))
        return result.logits.float().cpu()

    # ------------------------------------------------------------------------------------------------ text out
    def generate(self, context: list[int], max_new_tokens: int, *, until: Sequence[str] = (),
                 temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
                 on_text: Callable[[str], None] | None = None) -> tuple[str, int]:
        """Continue a context: (the text up to the first `until` string or the end of the document, tokens
        generated). When the context and max_new_tokens do not fit the model's window, the generation budget
        shrinks first, down to what leaves the context half of the window, then the context is cut from the
        left. on_text receives each piece of text as soon as it is decoded (streaming). seed: of the EBT's starts
        and of sampling; None keys it by (thinking.seed, the prompt's tokens), so a prompt's answer does not
        depend on which requests came before it."""
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

        if seed is None:
            key = f"ebt-generate:{self.thinking.seed}".encode()
            digest = hashlib.blake2b(torch.tensor(prompt).numpy().tobytes(), digest_size=8, key=key).digest()
            seed = int.from_bytes(digest, "little") >> 1
        generator = torch.Generator(device=self.device).manual_seed(seed)
        generate(self.model, torch.tensor([prompt], device=self.device), max_new_tokens,
                 steps=self.steps if self.is_ebt else None, samples=self.thinking.samples,
                 selection=self.thinking.selection, temperature=temperature, top_p=top_p, generator=generator,
                 on_token=on_token)
        text = _before_stop(stream.text, stops)
        if on_text is not None and len(text) > shown:  # bytes of a character the budget cut off, as decoded
            on_text(text[shown:])
        return text, count


def _before_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]
