"""A small synthetic language with one right answer, to check a sampler end to end on CPU in seconds.

A prompt is a noise prefix of 0..``max_prefix`` digits, a word of ``word_length`` letters and ``=``; the answer is
the word again, then EOS to the end of the answer span::

    "37" "cabhdaeg" "="  ->  "cabhdaeg" EOS EOS ...

The answer depends on the prompt only, so a trained model knows every answer position at once: one token per
forward pass and confidence-threshold parallel decoding must produce the same text, the latter in a few passes.
Training uses the real SFT objective (prompt never masked, EOS padding part of the response).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlmoe.diffusion import MaskedDiffusionObjective, ObjectiveSettings
from dlmoe.model import DiffusionMoE, build_model, get_flavor
from dlmoe.model.config import BYTE_EOS_ID, BYTE_MASK_ID
from dlmoe.parallel.schedule import lr_at

LETTERS = b"abcdefgh"
DIGITS = b"0123456789"
SEPARATOR = ord("=")


@dataclass(frozen=True)
class CopyTask:
    """Geometry of the copy language (byte-level ids)."""

    word_length: int = 8
    max_prefix: int = 4
    answer_length: int = 24

    @property
    def seq_len(self) -> int:
        return self.max_prefix + self.word_length + 1 + self.answer_length

    def sample(self, count: int, generator: torch.Generator) -> tuple[list[list[int]], list[list[int]]]:
        """``count`` prompts and their answers (the word, without EOS)."""
        prefix_lengths = torch.randint(0, self.max_prefix + 1, (count,), generator=generator).tolist()
        digits = torch.randint(0, len(DIGITS), (count, self.max_prefix), generator=generator).tolist()
        letters = torch.randint(0, len(LETTERS), (count, self.word_length), generator=generator).tolist()
        prompts, answers = [], []
        for n, ds, ls in zip(prefix_lengths, digits, letters, strict=True):
            word = [LETTERS[i] for i in ls]
            prompts.append([DIGITS[i] for i in ds[:n]] + word + [SEPARATOR])
            answers.append(word)
        return prompts, answers

    def batch(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training rows [count, seq_len] (prompt, answer, EOS padding) and their prompt lengths."""
        prompts, answers = self.sample(count, generator)
        rows = [p + a + [BYTE_EOS_ID] * (self.seq_len - len(p) - len(a)) for p, a in zip(prompts, answers, strict=True)]
        return torch.tensor(rows), torch.tensor([len(p) for p in prompts])


def train_copy_model(task: CopyTask, steps: int = 300, batch_size: int = 64, lr: float = 3e-3,
                     seed: int = 0) -> tuple[DiffusionMoE, list[float]]:
    """Train the ``debug`` flavor on the copy language; returns the model (in eval mode) and the losses."""
    model = build_model(get_flavor("debug"), seed=seed)
    objective = MaskedDiffusionObjective(ObjectiveSettings(
        mask_token_id=BYTE_MASK_ID, seed=seed, global_batch_size=batch_size, sft=True, variable_length_prob=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        rows, prompt_lengths = task.batch(batch_size, generator)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, base_lr=lr, total_steps=steps, warmup_steps=20, schedule="wsd",
                                min_lr_ratio=0.05, decay_fraction=0.3)
        sample_index = torch.arange(step * batch_size, (step + 1) * batch_size)
        out = objective(model, rows, sample_index, epoch=0, prompt_len_B=prompt_lengths)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(out.diffusion_loss))
    return model.eval(), losses
