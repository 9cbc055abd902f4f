"""What a causal LM is judged by: perplexity on the eval text (sliding windows), next-token agreement with the
original, and generation speed (prefill and decode tokens per second at batch 1, greedy, with the KV cache)."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Perplexity:
    perplexity: float
    tokens: int  # tokens scored
    windows: int
    seq_len: int
    stride: int
    accuracy: float  # next-token top-1 accuracy on the text
    argmax: np.ndarray  # the predicted next token at each scored position (for agreement with another model)

    def summary(self) -> dict:
        return {"perplexity": round(self.perplexity, 4), "tokens": self.tokens, "windows": self.windows,
                "seq_len": self.seq_len, "stride": self.stride, "next_token_accuracy": round(self.accuracy, 6)}


def _logits(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = module(input_ids=ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


@torch.inference_mode()
def perplexity(module: torch.nn.Module, stream: np.ndarray, seq_len: int, stride: int | None,
               max_tokens: int) -> Perplexity:
    """exp(mean NLL) of the stream's first `max_tokens` tokens, in windows of `seq_len` starting `stride` apart;
    each token is scored once, with the context its window gives (Hugging Face's sliding-window recipe)."""
    tokens = torch.as_tensor(stream[:max_tokens], dtype=torch.long)
    stride = min(stride or seq_len, seq_len)
    nll, scored, correct, windows, argmax = 0.0, 0, 0, 0, []
    prev_end = 0
    for begin in range(0, max(1, len(tokens) - 1), stride):
        end = min(begin + seq_len, len(tokens))
        new = end - max(prev_end, begin + 1)  # positions whose target is first scored in this window
        if new <= 0:
            break
        window = tokens[begin:end]
        logits = _logits(module, window[None])[0, :-1]
        targets = window[1:]
        logits, targets = logits[-new:], targets[-new:]
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        predicted = logits.argmax(-1)
        correct += int((predicted == targets).sum())
        argmax.append(predicted.numpy())
        scored += new
        windows += 1
        prev_end = end
        if end == len(tokens):
            break
    return Perplexity(perplexity=math.exp(nll / scored), tokens=scored, windows=windows, seq_len=seq_len,
                      stride=stride, accuracy=correct / scored, argmax=np.concatenate(argmax))


def agreement(reference: Perplexity, other: Perplexity) -> float | None:
    """The fraction of positions where both models predict the same next token."""
    if reference.argmax.shape != other.argmax.shape:
        return None
    return round(float((reference.argmax == other.argmax).mean()), 6)


@torch.inference_mode()
def _generate(module: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    """(prefill seconds, seconds of each decode step) of one greedy generation with the KV cache."""
    started = time.perf_counter()
    out = module(input_ids=ids, use_cache=True)
    prefill = time.perf_counter() - started
    past, token, steps = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    for _ in range(new_tokens):
        started = time.perf_counter()
        out = module(input_ids=token, past_key_values=past, use_cache=True)
        steps.append(time.perf_counter() - started)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return prefill, steps


def generation_speed(module: torch.nn.Module, prompt: np.ndarray, new_tokens: int, repeats: int = 3) -> dict:
    """Greedy generation at batch 1 with the KV cache: prefill tokens/s (the prompt in one call) and decode
    tokens/s (one token per call), medians over `repeats` generations after one to warm up."""
    return generation_pair([module], prompt, new_tokens, repeats)[0]


def generation_pair(modules: list[torch.nn.Module], prompt: np.ndarray, new_tokens: int, repeats: int = 3
                    ) -> list[dict]:
    """generation_speed of several models, their generations alternated (a, b, a, b...) so that a change in the
    machine's load hits each alike."""
    ids = torch.as_tensor(prompt[None], dtype=torch.long)
    runs: list[list[tuple[float, list[float]]]] = [[] for _ in modules]
    for _ in range(repeats + 1):  # the first round warms up
        for module, timed in zip(modules, runs):
            timed.append(_generate(module, ids, new_tokens))
    out = []
    for timed in runs:
        prefill_s = statistics.median(p for p, _ in timed[1:])
        decode_s = statistics.median(s for _, steps in timed[1:] for s in steps)
        out.append({"prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens,
                    "prefill_tokens_per_s": round(ids.shape[1] / prefill_s, 2),
                    "decode_tokens_per_s": round(1 / decode_s, 2), "decode_ms_per_token": round(decode_s * 1000, 3)})
    return out
