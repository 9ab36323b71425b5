"""lm-evaluation-harness adapter: the model type "ebt", for an EBT or a Transformer++ checkpoint.

    python -m eval.lm_eval_adapter run --model ebt --model_args checkpoint=runs/NAME,steps=4 --tasks TASK
    # from Python: import eval.lm_eval_adapter, then lm_eval.simple_evaluate(model="ebt", model_args=...)

Model arguments: checkpoint (run dir, checkpoint dir or `ebt export` dir; required), steps (EBT thinking steps,
default: the trained ones), samples (chains per token, default 1), selection (min | max | max_gap), seed (the
chains' starts), tokenizer (default: the checkpoint's own), device, batch_size, max_gen_toks (default 256).
Everything is scored by eval.scoring.Scorer, the same code as `ebt eval --task`, so an EBT's log-likelihood of a
continuation is the sum of the log-softmax of its thinking loop's final logits at the continuation's tokens,
and an EBT predicts from its visible prefix alone, like a causal LM. The harness is an optional dependency:
`pip install -e '.[lm_eval]'`.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    import lm_eval.models  # noqa: F401 - registers the harness's own models first, so they stay available
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - only without the optional extra
    raise ImportError("the lm-evaluation-harness adapter needs lm_eval: pip install -e '.[lm_eval]'") from error

from eval.scoring import Scorer, Thinking

MODEL_NAME = "ebt"
DEFAULT_MAX_GEN_TOKS = 256


def _int(name: str, value: Any, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_args {name}: expected an integer, got {value!r}") from None
    if number < minimum or (isinstance(value, float) and value != number):
        raise ValueError(f"model_args {name}: must be an integer >= {minimum}, got {value!r}")
    return number


def _device(requested: str | None) -> str:
    """The harness's command line asks for cuda by default; without a GPU that means the CPU (said once)."""
    import torch

    if not requested:
        return "cpu"
    if str(requested).startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("device %s is not available here; evaluating on the CPU", requested)
        return "cpu"
    return str(requested)


@register_model(MODEL_NAME)
class EBTHarnessLM(LM):
    """An `ebt` checkpoint as a harness LM (one process; the harness's own data parallelism is not used)."""

    def __init__(self, checkpoint: str | None = None, steps: int | None = None, samples: int = 1,
                 selection: str = "min", seed: int = 0, tokenizer: str | None = None, device: str | None = None,
                 batch_size: int | str | None = 8, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 max_batch_size: int | None = None, **unused: Any) -> None:
        super().__init__()
        if not checkpoint:
            raise ValueError("model_args checkpoint: required, e.g. --model_args checkpoint=runs/NAME,steps=4")
        if unused:
            raise ValueError(f"model_args {sorted(unused)[0]}: unknown argument; expected checkpoint, steps, samples, "
                             "selection, seed, tokenizer, device, batch_size, max_gen_toks")
        # "auto" asks the harness to search a batch size; scoring here is memory-light at these sizes: keep 8.
        batch = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else _int("batch_size",
                                                                                                  batch_size, 1)
        thinking = Thinking(steps=None if steps is None else _int("steps", steps, 0),
                            samples=_int("samples", samples, 1), selection=str(selection), seed=_int("seed", seed, 0))
        self.scorer = Scorer.load(str(checkpoint), tokenizer=tokenizer, thinking=thinking, device=_device(device),
                                  batch_size=batch)
        self.max_gen_toks = _int("max_gen_toks", max_gen_toks, 1)
        self._device = self.scorer.device

    @property
    def max_length(self) -> int:
        return self.scorer.context_length

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self.scorer.encode_pair(context, continuation) for context, continuation in
                 (request.args for request in requests)]
        results = self.scorer.loglikelihood(pairs)
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            logprob = self.scorer.rolling_loglikelihood(self.scorer.encode(text))
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, logprob)
            out.append(logprob)
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = _int("max_gen_toks", kwargs.pop("max_gen_toks", self.max_gen_toks), 1)
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if kwargs.pop("do_sample", False) else 0.0
            top_p = kwargs.pop("top_p", None)
            text, _ = self.scorer.generate(self.scorer.encode(context), max_new, until=until, temperature=temperature,
                                           top_p=None if temperature == 0 or top_p is None else float(top_p))
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out


def main() -> None:
    """The harness's own command line, with the "ebt" model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
