"""Knowledge distillation: the job's model (the student, usually pruned or otherwise compressed by earlier steps)
learns the teacher's softened outputs, mixed with the labels:

    loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels)
           + feature_weight * sum over `features` of MSE(student layer output, teacher layer output)

The teacher is `original` (the uploaded file, loaded again) or another model of the team, in any format that runs:
its outputs over the training set are computed once on its own runtime (ONNX Runtime for an ONNX teacher), so the
teacher costs one pass, not one per epoch. Feature matching needs the teacher's layers, so it needs a torch
teacher (package, Hugging Face folder or .pt2) and runs it per batch.

Measured here (bench/RESULTS.md): KD (T=4, alpha=0.7) on the 50%-channel-pruned ResNet recovers to 99.7% in 3 epochs;
label-free (alpha=1) too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from app.recipes import DistillSpec
from worker.engine import metrics
from worker.engine.datasets import arrange
from worker.engine.errors import EngineError
from worker.engine.formats import get_format
from worker.engine.formats.base import LoadedModel, first_tensor
from worker.engine.passes.base import Pass, StepContext, StepReport, register
from worker.engine.shared.data import classification_loss, dataset_arrays
from worker.engine.shared.training import predict, set_training, trainable_module, train

_TORCH_TEACHERS = ("package", "hf", "pt2")


def load_teacher(ctx: StepContext, teacher: str) -> LoadedModel:
    if teacher not in ctx.teachers:
        raise EngineError("bad_teacher", f"steps[{ctx.index}]: teacher {teacher!r} was not staged for this job")
    path, fmt_name = ctx.teachers[teacher]
    try:
        return get_format(fmt_name).load(path, ctx.workdir)
    except EngineError as exc:
        raise EngineError("bad_teacher", f"steps[{ctx.index}]: the teacher {teacher!r} does not load: "
                                         f"{exc.message}") from exc


def teacher_outputs(ctx: StepContext, teacher: LoadedModel, data) -> np.ndarray:
    """The teacher's first output over a dataset, on its native runtime."""
    fmt = get_format(teacher.format)
    try:
        arrays = arrange(data, fmt.input_specs(teacher))
        run = fmt.runner(teacher, fmt.runtimes[0], ctx.threads)
        return metrics.predict(run, arrays, fmt.fixed_batch(teacher)).astype(np.float32)
    except EngineError as exc:
        raise EngineError("bad_teacher", f"steps[{ctx.index}]: the teacher cannot run on dataset {data.name!r}: "
                                         f"{exc.message}") from exc
    except Exception as exc:
        raise EngineError("bad_teacher", f"steps[{ctx.index}]: the teacher failed on dataset {data.name!r}: "
                                         f"{type(exc).__name__}: {str(exc)[:500]}") from exc


def _torch_module(teacher: LoadedModel) -> nn.Module:
    if teacher.format == "pt2":
        return teacher.handle.module()
    return teacher.handle


class _Features:
    """Forward hooks that keep the outputs of named modules during one forward."""

    def __init__(self, net: nn.Module, names: list[str], who: str, index: int):
        modules = dict(net.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise EngineError("bad_teacher", f"steps[{index}]: features {missing} are not modules of the {who} "
                                             f"(modules: {sorted(k for k in modules if k)[:40]})")
        self.outputs: dict[str, torch.Tensor] = {}
        self.hooks = [modules[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.outputs[name] = first_tensor(output)
        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _check_scores(net: nn.Module, arrays: list[np.ndarray], soft: np.ndarray, index: int) -> None:
    """The student scores classes (N, classes), and the same classes as the teacher's outputs `soft`."""
    set_training(net, False)
    with torch.no_grad():
        probe = first_tensor(net(*[torch.from_numpy(np.ascontiguousarray(a[:2])) for a in arrays]))
    if probe.ndim != 2:
        raise EngineError("bad_dataset", f"steps[{index}]: distillation needs class scores (N, classes) as "
                                         f"the model output, got shape {tuple(probe.shape)}")
    if soft.ndim != 2 or soft.shape[1] != probe.shape[1]:
        raise EngineError("bad_teacher", f"steps[{index}]: the teacher's output has shape "
                                         f"{tuple(soft.shape[1:])} per sample, the student's {tuple(probe.shape[1:])}"
                                         ": they must score the same classes")


@register(DistillSpec)
class Distill(Pass):
    def apply(self, model: LoadedModel, spec: DistillSpec, ctx: StepContext) -> StepReport:
        net = trainable_module(model, "distillation")
        data = ctx.datasets.get(spec.dataset)
        if data is None:
            raise EngineError("bad_dataset", f"steps[{ctx.index}]: distillation trains on the {spec.dataset!r} "
                                             "dataset, which was not given")
        if spec.needs_labels and data.labels is None:
            raise EngineError("bad_dataset", f"steps[{ctx.index}]: alpha {spec.alpha} mixes in the label loss, but "
                                             f"dataset {spec.dataset!r} has no labels: set alpha 1 (label-free) or "
                                             "hard_labels true, or upload labels")
        arrays = dataset_arrays(model, data)
        teacher = load_teacher(ctx, spec.teacher)
        ctx.progress(0.0, f"running the teacher ({spec.teacher}, {teacher.format}) over {data.size} samples")
        soft = teacher_outputs(ctx, teacher, data)
        _check_scores(net, arrays, soft, ctx.index)
        device = ctx.device
        soft_t = torch.from_numpy(soft).to(device)
        true_labels = torch.from_numpy(data.labels.astype(np.int64)).to(device) if data.labels is not None else None
        labels = soft_t.argmax(1) if spec.hard_labels else true_labels  # what the label loss trains on
        T = spec.temperature

        features_s = features_t = None
        teacher_net = None
        if spec.features:
            if teacher.format not in _TORCH_TEACHERS:
                raise EngineError("bad_teacher", f"steps[{ctx.index}]: feature matching reads the teacher's layers: "
                                                 f"it needs a torch teacher ({_TORCH_TEACHERS}), not {teacher.format}")
            teacher_net = _torch_module(teacher).to(device).eval()
            features_s = _Features(net, spec.features, "student", ctx.index)
            features_t = _Features(teacher_net, spec.features, "teacher", ctx.index)
            for p in teacher_net.parameters():
                p.requires_grad_(False)

        def loss_fn(out: torch.Tensor, idx: torch.Tensor, args: list[torch.Tensor]) -> tuple[torch.Tensor, int | None]:
            idx = idx.to(device)
            loss = out.new_zeros(())
            if spec.alpha > 0:
                kl = F.kl_div(F.log_softmax(out / T, dim=1), F.softmax(soft_t[idx] / T, dim=1), reduction="batchmean")
                loss = loss + spec.alpha * T * T * kl
            y = labels[idx] if labels is not None else None
            if spec.alpha < 1:
                loss = loss + (1 - spec.alpha) * classification_loss(out, y, ctx.index, "distillation")
            if teacher_net is not None and spec.feature_weight > 0:
                with torch.no_grad():
                    teacher_net(*args)
                for name in spec.features:
                    s, t = features_s.outputs[name], features_t.outputs[name]
                    if s.shape != t.shape:
                        raise EngineError("bad_teacher", f"steps[{ctx.index}]: feature {name!r} is {tuple(s.shape)} in "
                                                         f"the student and {tuple(t.shape)} in the teacher; match "
                                                         "layers that keep the teacher's layout")
                    loss = loss + spec.feature_weight * F.mse_loss(s.float(), t.float())
            right = int((out.detach().argmax(1) == true_labels[idx]).sum()) if true_labels is not None else None
            return loss, right

        eval_fn = self._eval_fn(model, ctx, teacher)
        try:
            result = train(model, net, spec, ctx, arrays, loss_fn, eval_fn, "distillation")
        finally:
            for f in (features_s, features_t):
                if f is not None:
                    f.remove()
        agreement = float((predict(net, arrays, "cpu").argmax(1).numpy() == soft.argmax(1)).mean())
        return {
            "type": "distill", "teacher": spec.teacher, "teacher_format": teacher.format, "dataset": spec.dataset,
            "samples": data.size, "device": device, "temperature": T, "alpha": spec.alpha,
            "hard_labels": spec.hard_labels, "label_free": not spec.needs_labels,
            "features": spec.features, "optimizer": spec.optimizer, "lr": spec.lr, "schedule": spec.schedule,
            "batch_size": spec.batch_size, "weight_decay": spec.weight_decay, "grad_clip": spec.grad_clip,
            "keep": spec.keep, "seed": spec.seed, "train_agreement_with_teacher": round(agreement, 6),
            **result.report(), "notes": result.notes,
        }

    @staticmethod
    def _eval_fn(model: LoadedModel, ctx: StepContext, teacher: LoadedModel):
        """Per-epoch figures on the eval dataset: accuracy (when labelled, the score for keep: best) and agreement
        with the teacher."""
        data = ctx.datasets.get("eval")
        if data is None:
            return None
        arrays = dataset_arrays(model, data)
        reference = teacher_outputs(ctx, teacher, data).argmax(1)
        labels = data.labels

        def evaluate(net: nn.Module) -> dict[str, float]:
            top1 = predict(net, arrays, ctx.device).argmax(1).numpy()
            figures = {}
            if labels is not None:
                figures["eval_accuracy"] = round(float((top1 == labels).mean()), 6)
            figures["eval_agreement"] = round(float((top1 == reference).mean()), 6)
            return figures

        return evaluate
