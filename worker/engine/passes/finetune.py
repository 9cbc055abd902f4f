"""Supervised fine-tuning of eager modules (cross-entropy on a labelled dataset), keeping pruned weights at zero.

Measured here (FACTS.md): 2 epochs bring a 50%-channel-pruned CNN back to 99.4%, 3 epochs keep a CNN at
99.7% with 80-90% unstructured sparsity as long as the mask is re-applied after every optimizer step.
"""

from __future__ import annotations

import time
from fnmatch import fnmatchcase

import numpy as np
import torch
from torch import nn

from app.recipes import FinetuneSpec
from worker.engine.errors import EngineError
from worker.engine.formats.base import LoadedModel, first_tensor, get_format
from worker.engine.passes.base import Pass, StepContext, StepReport, register
from worker.engine.passes.channel import classification_loss, dataset_arrays, eager_module


def _selected(name: str, targets: list[str] | None, ignore: list[str]) -> bool:
    return (targets is None or any(fnmatchcase(name, p) for p in targets)) \
        and not any(fnmatchcase(name, p) for p in ignore)


def _optimizer(spec: FinetuneSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay)
    cls = torch.optim.AdamW if spec.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=spec.lr, weight_decay=spec.weight_decay)


def _accuracy(net: nn.Module, arrays: list[np.ndarray], labels: np.ndarray, batch: int = 256) -> float:
    net.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch):
            args = [torch.from_numpy(np.ascontiguousarray(a[start:start + batch])) for a in arrays]
            out = first_tensor(net(*args))
            correct += int((out.argmax(1).numpy() == labels[start:start + batch]).sum())
    return round(correct / max(1, len(labels)), 6)


@register(FinetuneSpec)
class Finetune(Pass):
    def apply(self, model: LoadedModel, spec: FinetuneSpec, ctx: StepContext) -> StepReport:
        net = eager_module(model, "fine-tuning")
        data = ctx.datasets.get(spec.dataset)
        if data is None or data.labels is None:
            what = "was not given" if data is None else "has no labels"
            raise EngineError("bad_dataset", f"steps[{ctx.index}]: fine-tuning trains on the {spec.dataset!r} "
                                             f"dataset with labels, but it {what}")
        arrays = dataset_arrays(model, data)
        labels = torch.from_numpy(data.labels.astype(np.int64))
        eval_data = ctx.datasets.get("eval") if spec.dataset != "eval" else None
        eval_arrays = dataset_arrays(model, eval_data) if eval_data is not None and eval_data.labels is not None \
            else None

        params = [(n, p) for n, p in net.named_parameters() if p.dtype.is_floating_point]
        trained = [(n, p) for n, p in params if _selected(n, spec.targets, spec.ignore)]
        if not trained:
            raise EngineError("no_effect", f"steps[{ctx.index}]: no parameter matched targets={spec.targets} "
                                           f"ignore={spec.ignore}; parameters: {[n for n, _ in params][:50]}")
        trained_ids = {id(p) for _, p in trained}
        frozen = [p for _, p in params if id(p) not in trained_ids]
        requires = {id(p): p.requires_grad for _, p in params}
        for p in frozen:
            p.requires_grad_(False)
        for _, p in trained:
            p.requires_grad_(True)

        # Pruned weights (exact zeros of Linear/Conv weights) stay zero: masks re-applied after each step.
        eligible = {r.name for r in get_format(model.format).eligible_weights(model)}
        masks = [(p, p.detach() == 0) for n, p in trained if n in eligible and bool((p == 0).any())]
        kept_zeros = sum(int(m.sum()) for _, m in masks)
        before = [p.detach().clone() for _, p in trained]

        torch.manual_seed(spec.seed)
        gen = torch.Generator().manual_seed(spec.seed)
        opt = _optimizer(spec, [p for _, p in trained])
        n = len(labels)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        epochs = []
        try:
            for epoch in range(spec.epochs):
                started = time.perf_counter()
                net.train()
                loss_sum, correct, seen = 0.0, 0, 0
                for idx in torch.randperm(n, generator=gen).split(spec.batch_size):
                    if has_bn and len(idx) == 1:
                        continue  # batch norm in train mode cannot take a batch of one
                    sel = idx.numpy()
                    args = [torch.from_numpy(np.ascontiguousarray(a[sel])) for a in arrays]
                    y = labels[idx]
                    opt.zero_grad(set_to_none=True)
                    out = first_tensor(net(*args))
                    loss = classification_loss(out, y, ctx.index, "fine-tuning")
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for p, m in masks:
                            p.masked_fill_(m, 0.0)
                    loss_sum += float(loss.detach()) * len(idx)
                    correct += int((out.detach().argmax(1) == y).sum())
                    seen += len(idx)
                mean_loss = loss_sum / max(1, seen)
                if not np.isfinite(mean_loss):  # shipping NaN weights as "succeeded" would be worse than failing
                    raise EngineError("diverged", f"steps[{ctx.index}]: training diverged in epoch {epoch + 1} "
                                                  f"(loss {mean_loss}); lower lr (now {spec.lr})")
                row = {"epoch": epoch + 1, "loss": round(mean_loss, 6),
                       "train_accuracy": round(correct / max(1, seen), 6)}
                if eval_arrays is not None:
                    row["eval_accuracy"] = _accuracy(net, eval_arrays, eval_data.labels)
                row["seconds"] = round(time.perf_counter() - started, 4)
                epochs.append(row)
                extra = f", eval accuracy {row['eval_accuracy']:.4f}" if "eval_accuracy" in row else ""
                ctx.progress((epoch + 1) / spec.epochs, f"epoch {epoch + 1}/{spec.epochs}: loss {mean_loss:.4f}, "
                                                        f"train accuracy {row['train_accuracy']:.4f}{extra}")
        finally:
            net.eval()
            for _, p in params:
                p.requires_grad_(requires[id(p)])

        changed = sum(int((p.detach() != b).sum()) for (_, p), b in zip(trained, before))
        if changed == 0:
            raise EngineError("no_effect", f"steps[{ctx.index}]: fine-tuning changed no weight (lr {spec.lr})")
        still_zero = sum(int((p.detach()[m] == 0).sum()) for p, m in masks)
        return {
            "type": "finetune", "dataset": spec.dataset, "samples": n, "epochs": epochs,
            "optimizer": spec.optimizer, "lr": spec.lr, "batch_size": spec.batch_size,
            "weight_decay": spec.weight_decay, "seed": spec.seed,
            "trained_params": sum(p.numel() for _, p in trained), "frozen_params": sum(p.numel() for p in frozen),
            "masked_layers": len(masks), "zeros_kept": still_zero, "zeros_before": kept_zeros,
            "weights_changed": changed,
            "final_loss": epochs[-1]["loss"] if epochs else None,
            "final_train_accuracy": epochs[-1]["train_accuracy"] if epochs else None,
        }
