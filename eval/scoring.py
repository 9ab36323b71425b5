"""A checkpoint as a language model over text: log-likelihoods (and, from launch/textgen.py's TextModel, generation),
for an EBT and a Transformer++.

Both the downstream tasks (`ebt eval --task`, eval/tasks/) and the lm-evaluation-harness adapter
(eval/lm_eval_adapter.py) score through `Scorer`, so the two agree by construction.

Conventions:
- Every scored or generated text starts a document: it is preceded by the end-of-document token, which is what
  precedes every document but the first in the packed training stream (there is no BOS in training).
- A sequence longer than the context is cut from the left, keeping the tokens nearest to what is scored.
- For an EBT, the log-probability of token t+1 is the log-softmax of the thinking loop's final logits at
  position t (`model.think`), with `steps` steps and `samples` chains (kept per token by `selection`).
  Chain m at position t starts from logits keyed by (seed, m, the tokens 0..t it sees) (ebt/starts.py, the
  draw `ebt generate` starts the same position from), so a position's
  prediction depends only on its visible prefix, like a causal LM's: the same prefix gets the same
  distribution in every request and batch, and a continuation's score does not depend on what follows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

# Thinking and check_device live beside the model (ebt/generation.py), the keyed starts in ebt/starts.py, text
# generation in launch/textgen.py; they are imported here from below, for the tasks, the adapter and their tests.
from ebt.generation import Thinking, check_device
from ebt.starts import prefix_keyed_starts
from launch.textgen import TextModel

__all__ = ["Scorer", "Thinking", "check_device", "prefix_keyed_starts"]


class Scorer(TextModel):
    """A TextModel (encode, decode, generate) that also scores: log-likelihoods of continuations and documents."""

    def __init__(self, model, model_cfg, tokenizer_dir: str, thinking: Thinking | None = None,
                 batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        super().__init__(model, model_cfg, tokenizer_dir, thinking)

    @classmethod
    def load(cls, checkpoint: str | Path, *, tokenizer: str | None = None, thinking: Thinking | None = None,
             device: str = "cpu", batch_size: int = 8) -> Scorer:
        """From a run dir, checkpoint dir or export dir; the tokenizer is found as launch/run_dir.py says."""
        from launch.checkpoint import load_model, resolve_checkpoint
        from launch.run_dir import find_tokenizer

        path = resolve_checkpoint(checkpoint)
        model, cfg = load_model(path, device=device)
        found = find_tokenizer(path, tokenizer, model_vocab=cfg.architecture.vocab_size)
        scorer = cls(model, cfg, found, thinking, batch_size)
        scorer.checkpoint = path
        return scorer

    # ------------------------------------------------------------------------------------------------ text
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
        think = self.thinking
        # Chain m at position t starts from ebt.starts' draw keyed by (seed, m, tokens[:t+1]) (think's default):
        # the right padding after a row never reaches its real positions.
        result = self.model.think(inputs.to(device), self.steps, think.samples, think.selection, seed=think.seed)
        return result.logits.float().cpu()
