"""torch.export programs (.pt2). Run through ep.module(); weights are edited in ep.state_dict in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from worker.engine.errors import EngineError
from worker.engine.formats import _torch
from worker.engine.formats.base import InputSpec, LoadedModel, ModelFormat, Runner, WeightRef, register

# aten ops whose argument at this index is a layer weight (Linear/Conv in an exported graph).
_WEIGHT_ARG = {
    "aten.linear.default": 1,
    "aten.conv1d.default": 1,
    "aten.conv2d.default": 1,
    "aten.conv3d.default": 1,
    "aten.conv1d.padding": 1,
    "aten.conv2d.padding": 1,
    "aten.conv3d.padding": 1,
    "aten.convolution.default": 1,
    "aten.conv_transpose1d.default": 1,
    "aten.conv_transpose2d.input": 1,
    "aten.conv_transpose3d.input": 1,
    "aten.mm.default": 1,
    "aten.addmm.default": 2,
}


def _numpy_dtype(dtype: torch.dtype) -> np.dtype | None:
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except TypeError:
        return None


def register_quantized_ops() -> None:
    """Registers the quantized_decomposed ops an int8 PT2E program calls, which torch.export.load must resolve."""
    try:
        import torch.ao.quantization.fx._decomposed  # noqa: F401
    except ImportError:  # torch.ao.quantization moved to torchao
        import torchao.quantization.pt2e  # noqa: F401


@register
class Pt2Format(ModelFormat):
    name = "pt2"
    suffix = ".pt2"
    runtimes = ("torch", "torch-compile")

    def load(self, path: Path, workdir: Path) -> LoadedModel:
        register_quantized_ops()
        try:
            ep = torch.export.load(str(path))
        except Exception as exc:
            raise EngineError("bad_model", f"cannot load {path.name} as a torch.export program: "
                                           f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(ep, torch.export.ExportedProgram):
            raise EngineError("bad_model", f"{path.name} is not an ExportedProgram")
        return LoadedModel(format=self.name, path=path, handle=ep)

    def save(self, model: LoadedModel, path: Path) -> None:
        torch.export.save(model.handle, str(path))

    def export(self, model: LoadedModel, target: str, path: Path, examples: list[np.ndarray] | None) -> list[str]:
        if target == self.name:
            self.save(model, path)
            return []
        if target == "onnx":
            # An ExportedProgram carries its own dynamic dims; the exporter takes them from the program.
            if model.handle.example_inputs is not None:
                examples = None
            return _torch.export_onnx(model.handle, examples, path, dynamic_batch=self.fixed_batch(model) is None)
        raise EngineError("unsupported", f"a pt2 model cannot be written as {target}")

    def _module(self, model: LoadedModel):
        if "module" not in model.extra:
            model.extra["module"] = model.handle.module()
        return model.extra["module"]

    def _param_targets(self, model: LoadedModel) -> dict[str, str]:
        """Graph placeholder name -> state_dict key, for parameters only."""
        from torch.export.graph_signature import InputKind

        return {s.arg.name: s.target for s in model.handle.graph_signature.input_specs
                if s.kind == InputKind.PARAMETER and s.target is not None}

    def eligible_weights(self, model: LoadedModel) -> list[WeightRef]:
        ep = model.handle
        params = self._param_targets(model)
        names: list[str] = []
        for node in ep.graph.nodes:
            if node.op != "call_function":
                continue
            idx = _WEIGHT_ARG.get(str(node.target))
            if idx is None or len(node.args) <= idx:
                continue
            target = params.get(getattr(node.args[idx], "name", None))
            if target is not None and target not in names and ep.state_dict[target].ndim >= 2:
                names.append(target)
        return [_torch.tensor_ref(n, ep.state_dict[n]) for n in names]

    def parameters(self, model: LoadedModel) -> list[tuple[str, torch.Tensor]]:
        """Parameters, and the int8 weights of a PT2E-quantized program (stored as buffers or constants)."""
        ep = model.handle
        sd = ep.state_dict
        params = [(t, sd[t]) for t in self._param_targets(model).values() if t in sd]
        stored = {**{k: v for k, v in sd.items()}, **dict(ep.constants)}
        return params + [(k, v) for k, v in stored.items()
                         if isinstance(v, torch.Tensor) and v.dtype == torch.int8 and v.ndim >= 2]

    def input_specs(self, model: LoadedModel) -> list[InputSpec]:
        from torch.export.graph_signature import InputKind

        user = {s.arg.name for s in model.handle.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
        specs = []
        for node in model.handle.graph.nodes:
            if node.op == "placeholder" and node.name in user:
                val = node.meta.get("val")
                if isinstance(val, torch.Tensor):
                    shape = tuple(d if isinstance(d, int) else None for d in val.shape)
                    specs.append(InputSpec(node.name, shape, _numpy_dtype(val.dtype)))
                else:
                    specs.append(InputSpec(node.name, None, None))
        return specs

    def example_inputs(self, model: LoadedModel) -> list[np.ndarray] | None:
        ex = model.handle.example_inputs
        if not ex or not ex[0] or ex[1] or not all(isinstance(t, torch.Tensor) for t in ex[0]):
            return None
        return [t.detach().cpu().numpy() for t in ex[0]]

    def runner(self, model: LoadedModel, runtime: str, threads: int) -> Runner:
        return _torch.module_runner(self._module(model), threads, runtime)
