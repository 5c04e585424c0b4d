"""The lm-evaluation-harness adapter: ``DlmoeLM``, registered with ``lm_eval`` as the model ``dlmoe``.

    lm_eval.simple_evaluate(model="dlmoe", model_args={"pretrained": "runs/debug/hf", "mc_samples": 64}, tasks=[...])

Log-likelihood requests go through the Monte-Carlo ELBO (``dlmoe.diffusion.likelihood``): a masked-diffusion model
has no exact ``log p(continuation | context)``, so the score is the estimate of a lower bound, deterministic for the
seed. ``is_greedy`` — would greedy decoding produce the continuation? — is answered by actually decoding it: the
continuation's positions start masked and are filled by the sampler with one token per forward pass, the most
confident first, at temperature 0 (LLaDA's adapter offers the same check, off by default there); it costs one
forward pass per continuation token, and ``check_greedy=False`` skips it, reporting ``False``. Rolling
log-likelihoods (perplexity tasks) score the text in chunks of half the context, each given the text before it.
Generation requests go through the sampler with the adapter's settings; a task's ``until`` strings cut the answer
at the first one and ``max_gen_toks`` cuts it to that many tokens; the task's sampling settings are ignored (said
once) because the sampler's are the adapter's.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm_eval fills its model registry lazily only while it is empty: fill it first)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from dlmoe.diffusion import GenerationSettings, LikelihoodSettings, continuation_log_likelihood, generate
from dlmoe.errors import ModelInputError
from dlmoe.evaluation.loading import LoadedModel, load_for_eval

# Keys of a task's generation_kwargs the adapter honours; any other key is reported once as ignored.
HONOURED_GEN_KWARGS = {"until", "max_gen_toks"}


def _flag(value: Any) -> bool:
    """A boolean model arg: lm_eval hands ``key=false`` through as the string or as a bool."""
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes"}
    return bool(value)


@register_model("dlmoe")
class DlmoeLM(LM):  # type: ignore[misc]
    """A saved dlmoe model folder (or an already loaded one) as an lm-evaluation-harness model."""

    def __init__(self, pretrained: str | Path | LoadedModel, *, device: str | None = None,
                 batch_size: int | str | None = None, max_batch_size: int | None = None,
                 mc_samples: int = 64, mc_batch_size: int = 32, seed: int = 0, gen_length: int = 64,
                 block_length: int = 32, steps: int | None = None, threshold: float | None = None,
                 temperature: float = 0.0, check_greedy: bool | str = True, progress: bool | str = True) -> None:
        super().__init__()
        if isinstance(pretrained, LoadedModel):
            if device is not None:
                warnings.warn(f"device {device!r} is ignored: the model given is already loaded", stacklevel=2)
            self.loaded = pretrained
        else:
            self.loaded = load_for_eval(pretrained, device=device or "cpu")
        if max_batch_size is not None:
            warnings.warn(f"max_batch_size {max_batch_size} is ignored: batch_size sets the generation batch and "
                          f"mc_batch_size the Monte-Carlo one", stacklevel=2)
        # lm_eval's batch_size ("auto" or a count) sizes the generation batches; the ELBO has its own mc_batch_size.
        self.batch_size = int(batch_size) if batch_size is not None and str(batch_size).isdigit() else 1
        self.likelihood = LikelihoodSettings(samples=int(mc_samples), batch_size=int(mc_batch_size), seed=int(seed))
        self.likelihood.validate()
        self.generation = GenerationSettings(
            gen_length=int(gen_length), block_length=int(block_length),
            steps=int(gen_length if steps is None else steps),
            threshold=None if threshold is None else float(threshold), temperature=float(temperature), seed=int(seed))
        self.generation.validate([0], self.loaded.max_positions)
        self.check_greedy = _flag(check_greedy)
        self.progress = _flag(progress)
        self._warned: set[str] = set()

    @property
    def device(self) -> str:
        return str(next(self.loaded.model.parameters()).device)

    def settings(self) -> dict[str, Any]:
        """What the scores depend on, for the results file."""
        g = self.generation
        return {"mc_samples": self.likelihood.samples, "mc_batch_size": self.likelihood.batch_size,
                "seed": self.likelihood.seed, "gen_length": g.gen_length, "block_length": g.block_length,
                "steps": None if g.threshold is not None else g.steps, "threshold": g.threshold,
                "temperature": g.temperature, "check_greedy": self.check_greedy, "batch_size": self.batch_size}

    def get_model_info(self) -> dict[str, Any]:
        """Merged by lm_eval into its results' ``config``."""
        return {"model_dir": str(self.loaded.folder), "step": self.loaded.step, "source_run": self.loaded.source_run,
                **self.settings()}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a context and its continuation, split where tokenizing the whole text puts the boundary.

        Tokenizing the two halves apart would tokenize a word split by the boundary differently from the text the
        model saw in training; trailing spaces of the context belong to the continuation for the same reason. Where
        a token of the whole text straddles the boundary, the halves are tokenized apart after all."""
        encode = self.loaded.tokenizer.encode
        stripped = context.rstrip(" ")
        continuation = context[len(stripped):] + continuation
        whole = encode(stripped + continuation)
        prompt = encode(stripped) if stripped else []
        if whole[:len(prompt)] != prompt or len(whole) <= len(prompt):
            return prompt, encode(continuation)
        return prompt, whole[len(prompt):]

    def _fit(self, prompt: list[int], answer_length: int, where: str) -> list[int]:
        """The prompt, cut from the left so that it and ``answer_length`` tokens fit the model's context."""
        room = self.loaded.max_positions - answer_length
        if room < 0:
            raise ModelInputError(f"{where}: the continuation has {answer_length} tokens, more than the model's "
                                  f"context of {self.loaded.max_positions} positions")
        if len(prompt) > room:
            self._warn_once("truncated", f"contexts longer than {room} tokens are cut from the left to fit the "
                                         f"model's {self.loaded.max_positions} positions (first: {where})")
            return prompt[len(prompt) - room:]
        return prompt

    def _is_greedy(self, prompt: list[int], answer: list[int]) -> bool:
        length = len(answer)
        settings = GenerationSettings(gen_length=length, block_length=length, steps=length, stop_at_eos=False)
        result = generate(self.loaded.model, [prompt], settings, mask_id=self.loaded.mask_id,
                          eos_id=self.loaded.eos_id, pad_id=self.loaded.pad_id)
        return bool(result.sequences[0, result.prompt_width:].tolist() == answer)

    def _score(self, prompt: list[int], answer: list[int]) -> float:
        return continuation_log_likelihood(self.loaded.model, prompt, answer, mask_id=self.loaded.mask_id,
                                           settings=self.likelihood)

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(ELBO estimate of log p(continuation | context), is_greedy)`` per request."""
        results: list[tuple[float, bool]] = []
        for request in tqdm(requests, desc="log-likelihood", unit="request",
                            disable=disable_tqdm or not self.progress):
            context, continuation = request.args
            where = f"request {len(results)} of task {getattr(request, 'task_name', '?')}"
            prompt, answer = self._encode_pair(context, continuation)
            if not answer:
                raise ModelInputError(f"{where}: the continuation {continuation!r} tokenizes to nothing")
            prompt = self._fit(prompt, len(answer), where)
            greedy = self.check_greedy and self._is_greedy(prompt, answer)
            results.append((self._score(prompt, answer), greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), results[-1])
        return results

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """The ELBO of a whole text: chunks of half the context, each scored given up to the other half before it."""
        chunk = max(1, self.loaded.max_positions // 2)
        results: list[float] = []
        for request in tqdm(requests, desc="rolling log-likelihood", unit="request",
                            disable=disable_tqdm or not self.progress):
            (text,) = request.args
            ids = self.loaded.tokenizer.encode(text)
            total = 0.0
            for start in range(0, len(ids), chunk):
                answer = ids[start:start + chunk]
                prompt = ids[max(0, start - (self.loaded.max_positions - len(answer))):start]
                total += self._score(prompt, answer)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def _stop(self, text: str, ids: list[int], until: Sequence[str], max_tokens: int | None) -> str:
        if max_tokens is not None and len(ids) > max_tokens:
            text = self.loaded.tokenizer.decode(ids[:max_tokens])
        cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
        return text[:cut]

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Decode every context with the adapter's sampler settings; cut at ``until`` / ``max_gen_toks``."""
        outputs: list[str] = [""] * len(requests)
        jobs: list[tuple[int, list[int], list[str], int | None]] = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            ignored = sorted(set(gen_kwargs) - HONOURED_GEN_KWARGS)
            if ignored:
                self._warn_once(f"gen:{ignored}", f"generation settings {ignored} of task "
                                                  f"{getattr(request, 'task_name', '?')} are ignored: the sampler "
                                                  f"uses the adapter's ({self.settings()})")
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = gen_kwargs.get("max_gen_toks")
            prompt = self._fit(self.loaded.tokenizer.encode(context), self.generation.gen_length,
                               f"request {index} of task {getattr(request, 'task_name', '?')}")
            jobs.append((index, prompt, until, None if max_tokens is None else int(max_tokens)))
        with tqdm(total=len(jobs), desc="generation", unit="request",
                  disable=disable_tqdm or not self.progress) as bar:
            for start in range(0, len(jobs), self.batch_size):
                batch = jobs[start:start + self.batch_size]
                result = generate(self.loaded.model, [prompt for _, prompt, _, _ in batch], self.generation,
                                  mask_id=self.loaded.mask_id, eos_id=self.loaded.eos_id, pad_id=self.loaded.pad_id)
                for (index, _, until, max_tokens), ids in zip(batch, result.answers, strict=True):
                    outputs[index] = self._stop(self.loaded.tokenizer.decode(ids), ids, until, max_tokens)
                    self.cache_hook.add_partial("generate_until", requests[index].args, outputs[index])
                bar.update(len(batch))
        return outputs
