"""The training loop shared by the `finetune` and `distill` steps.

What it guarantees, whichever loss a step brings:
- only the parameters picked by `targets`/`ignore` train; the others are frozen and restored after;
- pruned weights (exact zeros of prunable layers) stay zero: masks re-applied after every optimizer step
  (measured: 3 epochs keep a CNN at 99.7% with 80-90% sparsity that way, bench/RESULTS.md);
- batch norm trains in train mode, evaluation runs in eval mode; a batch of one is skipped where BN would refuse it;
- one event per epoch (loss, train accuracy, eval accuracy / agreement, learning rate), progress within the step;
- `keep: best` restores the weights of the epoch with the best eval score;
- NaN loss fails the step (`diverged`) instead of shipping NaN weights; no weight changed fails it (`no_effect`);
- CUDA when the step's context says so, with bf16 autocast (mixed precision); the model goes back to CPU after.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn

from app.recipes import TrainingSpec
from worker.engine.errors import EngineError
from worker.engine.formats import get_format
from worker.engine.formats.base import LoadedModel, first_tensor
from worker.engine.shared.selection import eager_module

# loss(student output, sample indices of the batch, the batch inputs) -> (loss, number of correct top-1 or None)
LossFn = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]], tuple[torch.Tensor, int | None]]
# eval(net) -> figures for the epoch row (eval_accuracy and/or eval_agreement); the first value is the score
EvalFn = Callable[[nn.Module], dict[str, float]]
_PROGRESS_EVERY_S = 0.5


def _optimizer(spec: TrainingSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay)
    cls = torch.optim.AdamW if spec.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=spec.lr, weight_decay=spec.weight_decay)


def lr_factor(spec: TrainingSpec, epoch: int) -> float:
    """The learning-rate multiplier for a 0-based epoch."""
    if spec.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / spec.epochs))
    if spec.schedule == "step":
        return spec.gamma ** (epoch // spec.step_size)
    return 1.0


def trainable_module(model: LoadedModel, what: str) -> nn.Module:
    """The module a training step updates: the eager module of a package or Hugging Face folder, or for a .pt2
    the program's module(), whose parameters and buffers share storage with the program's state dict (so saving
    the program writes the trained weights). ONNX cannot train here (no ONNX Runtime training)."""
    if model.format == "pt2":
        return get_format("pt2")._module(model)
    return eager_module(model, what)


def set_training(net: nn.Module, training: bool) -> None:
    """train()/eval() for eager modules; an exported program's module refuses .train(), and batch norm and dropout
    in its graph are switched by torchao's helpers instead (bench/RESULTS.md)."""
    from torch.fx import GraphModule

    if isinstance(net, GraphModule):
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

        (move_exported_model_to_train if training else move_exported_model_to_eval)(net)
    else:
        net.train(training)


def predict(net: nn.Module, arrays: list[np.ndarray], device: str, batch: int = 256) -> torch.Tensor:
    """Outputs of `net` over all rows (on the CPU); the caller puts it in eval mode."""
    outs = []
    with torch.no_grad():
        for start in range(0, arrays[0].shape[0], batch):
            args = [torch.from_numpy(np.ascontiguousarray(a[start:start + batch])).to(device) for a in arrays]
            outs.append(first_tensor(net(*args)).float().cpu())
    return torch.cat(outs)


def batch_of(arrays: list[np.ndarray], idx: torch.Tensor, device: str) -> list[torch.Tensor]:
    sel = idx.numpy()
    return [torch.from_numpy(np.ascontiguousarray(a[sel])).to(device, non_blocking=True) for a in arrays]


@dataclass
class TrainResult:
    epochs: list[dict] = field(default_factory=list)
    kept_epoch: int | None = None
    trained_params: int = 0
    frozen_params: int = 0
    masked_layers: int = 0
    zeros_before: int = 0
    zeros_kept: int = 0
    weights_changed: int = 0
    notes: list[str] = field(default_factory=list)

    def report(self) -> dict:
        return {"epochs": self.epochs, "kept_epoch": self.kept_epoch, "trained_params": self.trained_params,
                "frozen_params": self.frozen_params, "masked_layers": self.masked_layers,
                "zeros_before": self.zeros_before, "zeros_kept": self.zeros_kept,
                "weights_changed": self.weights_changed,
                "final_loss": self.epochs[-1]["loss"] if self.epochs else None,
                "final_train_accuracy": self.epochs[-1].get("train_accuracy") if self.epochs else None}


class TrainingContext(Protocol):
    """What the loop needs of a step's context (StepContext has it)."""

    index: int
    device: str
    progress: Callable[[float, str], None]
    event: Callable[[str, dict], None]


def train(model: LoadedModel, net: nn.Module, spec: TrainingSpec, ctx: TrainingContext, arrays: list[np.ndarray],
          loss_fn: LossFn, eval_fn: EvalFn | None, what: str) -> TrainResult:
    """Train `net` (the model's module) in place with `loss_fn`; see the module docstring for the guarantees."""
    run = _Training(model, net, spec, ctx, what)
    try:
        run.unfreeze()
        for epoch in range(spec.epochs):
            run.epoch(epoch, arrays, loss_fn, eval_fn)
    finally:
        run.restore_flags()
    return run.finish()


class _Training:
    """One training run: which parameters train, their masks, the optimizer, the best epoch so far."""

    def __init__(self, model: LoadedModel, net: nn.Module, spec: TrainingSpec, ctx: TrainingContext, what: str):
        self.net, self.spec, self.ctx, self.what = net, spec, ctx, what
        device = ctx.device
        self.params = [(n, p) for n, p in net.named_parameters() if p.dtype.is_floating_point]
        self.trained = [(n, p) for n, p in self.params if spec.selects(n)]
        if not self.trained:
            raise EngineError("no_effect", f"steps[{ctx.index}]: no parameter matched targets={spec.targets} "
                                           f"ignore={spec.ignore}; parameters: {[n for n, _ in self.params][:50]}")
        self.result = TrainResult(trained_params=sum(p.numel() for _, p in self.trained))
        trained_ids = {id(p) for _, p in self.trained}
        self.frozen = [p for _, p in self.params if id(p) not in trained_ids]
        self.result.frozen_params = sum(p.numel() for p in self.frozen)
        self.requires = {id(p): p.requires_grad for _, p in self.params}
        eligible = {r.name for r in get_format(model.format).eligible_weights(model)}
        # Moving to CUDA replaces the tensors; the trained values are copied back into these CPU tensors at the
        # end, which a .pt2's state dict (and any tied weight) still points at.
        originals = {**dict(net.named_parameters()), **dict(net.named_buffers())} if device != "cpu" else {}
        self.originals = {k: v.data for k, v in originals.items()}
        net.to(device)
        self.masks = [(p, p.detach() == 0) for n, p in self.trained if n in eligible and bool((p == 0).any())]
        self.result.masked_layers = len(self.masks)
        self.result.zeros_before = sum(int(m.sum()) for _, m in self.masks)
        self.before = [p.detach().clone() for _, p in self.trained]
        torch.manual_seed(spec.seed)
        self.gen = torch.Generator().manual_seed(spec.seed)
        self.opt = _optimizer(spec, [p for _, p in self.trained])
        self.has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else None
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.last_progress = 0.0

    def unfreeze(self) -> None:
        for p in self.frozen:
            p.requires_grad_(False)
        for _, p in self.trained:
            p.requires_grad_(True)

    def restore_flags(self) -> None:
        set_training(self.net, False)
        for _, p in self.params:
            p.requires_grad_(self.requires[id(p)])

    def epoch(self, epoch: int, arrays: list[np.ndarray], loss_fn: LossFn, eval_fn: EvalFn | None) -> None:
        spec, ctx = self.spec, self.ctx
        started = time.perf_counter()
        lr = spec.lr * lr_factor(spec, epoch)
        for group in self.opt.param_groups:
            group["lr"] = lr
        set_training(self.net, True)
        mean_loss, correct, counted = self._batches(epoch, arrays, loss_fn)
        if not np.isfinite(mean_loss):  # shipping NaN weights as "succeeded" would be worse than failing
            raise EngineError("diverged", f"steps[{ctx.index}]: {self.what} diverged in epoch {epoch + 1} "
                                          f"(loss {mean_loss}); lower lr (now {spec.lr})")
        row: dict = {"epoch": epoch + 1, "loss": round(mean_loss, 6), "lr": lr}
        if counted:
            row["train_accuracy"] = round(correct / counted, 6)
        if eval_fn is not None:
            set_training(self.net, False)
            figures = eval_fn(self.net)
            row.update(figures)
            score = next(iter(figures.values()), None)
            if score is not None and (self.best is None or score > self.best[0]):
                self.best = (score, epoch + 1, {k: v.detach().clone() for k, v in self.net.state_dict().items()})
        row["seconds"] = round(time.perf_counter() - started, 4)
        self.result.epochs.append(row)
        ctx.event("epoch", row)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds", "lr"))
        ctx.progress((epoch + 1) / spec.epochs, f"epoch {epoch + 1}/{spec.epochs}: {shown}")

    def _batches(self, epoch: int, arrays: list[np.ndarray], loss_fn: LossFn) -> tuple[float, int, int]:
        """One pass over the data: (mean loss, correct top-1, samples counted for accuracy)."""
        spec, device = self.spec, self.ctx.device
        loss_sum, correct, counted, seen = 0.0, 0, 0, 0
        order = torch.randperm(arrays[0].shape[0], generator=self.gen).split(spec.batch_size)
        for b, idx in enumerate(order):
            if self.has_bn and len(idx) == 1:
                continue  # batch norm in train mode cannot take a batch of one
            args = batch_of(arrays, idx, device)
            self.opt.zero_grad(set_to_none=True)
            if self.autocast is not None:
                with self.autocast:
                    out = first_tensor(self.net(*args))
                out = out.float()
            else:
                out = first_tensor(self.net(*args))
            loss, right = loss_fn(out, idx, args)
            loss.backward()
            if spec.grad_clip is not None:
                nn.utils.clip_grad_norm_([p for _, p in self.trained], spec.grad_clip)
            self.opt.step()
            with torch.no_grad():
                for p, m in self.masks:
                    p.masked_fill_(m, 0.0)
            loss_sum += float(loss.detach()) * len(idx)
            if right is not None:
                correct, counted = correct + right, counted + len(idx)
            seen += len(idx)
            now = time.perf_counter()
            if now - self.last_progress >= _PROGRESS_EVERY_S:
                self.last_progress = now
                self.ctx.progress((epoch + (b + 1) / len(order)) / spec.epochs,
                                  f"epoch {epoch + 1}/{spec.epochs}, batch {b + 1}/{len(order)}")
        return loss_sum / max(1, seen), correct, counted

    def finish(self) -> TrainResult:
        """Keep the best epoch if asked, bring the weights back to the CPU tensors, count what changed."""
        spec, net, result = self.spec, self.net, self.result
        result.kept_epoch = spec.epochs
        if spec.keep == "best":
            if self.best is None:
                result.notes.append("keep: best needs an eval dataset (labels, or a teacher to agree with): kept the "
                                    "last epoch")
            else:
                net.load_state_dict(self.best[2])
                result.kept_epoch = self.best[1]
        if self.originals:
            with torch.no_grad():
                for name, value in {**dict(net.named_parameters()), **dict(net.named_buffers())}.items():
                    if name in self.originals:
                        self.originals[name].copy_(value.detach().to("cpu"))
                        value.data = self.originals[name]
        net.to("cpu")
        result.weights_changed = sum(int((p.detach().cpu() != b.cpu()).sum())
                                     for (_, p), b in zip(self.trained, self.before))
        if result.weights_changed == 0:
            raise EngineError("no_effect", f"steps[{self.ctx.index}]: {self.what} changed no weight (lr {spec.lr})")
        result.zeros_kept = sum(int((p.detach().cpu()[m.cpu()] == 0).sum()) for p, m in self.masks)
        return result
