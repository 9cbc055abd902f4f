"""ONNX models, run with onnxruntime (or OpenVINO: _openvino.py). Weights are initializers; external data only from beside the model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import external_data_helper, numpy_helper

from worker.engine.errors import EngineError
from worker.engine.formats._openvino import onnx_runner
from worker.engine.formats.base import InputSpec, LoadedModel, ModelFormat, Runner, WeightRef, register

# op type -> input positions that hold a layer weight (MatMulInteger/ConvInteger: ONNX Runtime dynamic int8).
_WEIGHT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1), "MatMulInteger": (1,),
                  "ConvInteger": (1,)}
# A weight often reaches MatMul through a Transpose/Identity of an initializer; in a QDQ int8 graph, through the
# DequantizeLinear of its int8 initializer.
_PASS_THROUGH = {"Transpose", "Identity", "DequantizeLinear"}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
_INT_WEIGHT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
# Quantized-graph inputs that carry a stored (quantized) parameter rather than a scale or zero point.
_QUANTIZED_VALUE_INPUTS = {"DequantizeLinear": 0, "MatMulInteger": 1, "ConvInteger": 1}
_MAX_PROTO_BYTES = 2**31 - 1


def _check_external_data(model: onnx.ModelProto, base: Path) -> bool:
    """Refuse external data that points outside the model's own folder (absolute, `..`, symlinks out)."""
    base_real = base.resolve()
    found = False
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        found = True
        info = external_data_helper.ExternalDataInfo(tensor)
        location = info.location or ""
        target = (base / location).resolve()
        if os.path.isabs(location) or ".." in Path(location).parts or base_real not in target.parents:
            raise EngineError("bad_model", f"initializer {tensor.name!r} refers to external data {location!r} "
                                           "outside the model's folder; export with external_data=False")
        if not target.is_file():
            raise EngineError("bad_model", f"initializer {tensor.name!r}: external data file {location!r} is missing")
    return found


@register
class OnnxFormat(ModelFormat):
    name = "onnx"
    suffix = ".onnx"
    runtimes = ("onnxruntime", "openvino")

    def load(self, path: Path, workdir: Path) -> LoadedModel:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise EngineError("bad_model", f"cannot parse {path.name} as ONNX: {type(exc).__name__}: {exc}") from exc
        if _check_external_data(model, path.parent):
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        loaded = LoadedModel(format=self.name, path=path, handle=model)
        try:
            self._session(loaded, threads=1)  # fail at load, not halfway through the job
        except Exception as exc:
            raise EngineError("bad_model", f"onnxruntime cannot load {path.name}: {type(exc).__name__}: {exc}") from exc
        return loaded

    def save(self, model: LoadedModel, path: Path) -> None:
        if model.handle.ByteSize() > _MAX_PROTO_BYTES:
            raise EngineError("unsupported", "the ONNX model is over 2 GiB; external-data output is not supported")
        onnx.save(model.handle, str(path))

    def export(self, model: LoadedModel, target: str, path: Path, examples: list[np.ndarray] | None) -> list[str]:
        if target != self.name:
            raise EngineError("unsupported", f"an ONNX model can only be written as ONNX, not {target}")
        self.save(model, path)
        return []

    def _initializers(self, model: LoadedModel) -> dict[str, onnx.TensorProto]:
        return {init.name: init for init in model.handle.graph.initializer}

    def eligible_weights(self, model: LoadedModel) -> list[WeightRef]:
        inits = self._initializers(model)
        producers = {out: node for node in model.handle.graph.node for out in node.output}
        names: list[str] = []
        for node in model.handle.graph.node:
            for pos in _WEIGHT_INPUTS.get(node.op_type, ()):
                if pos >= len(node.input):
                    continue
                name = node.input[pos]
                producer = producers.get(name)
                if name not in inits and producer is not None and producer.op_type in _PASS_THROUGH:
                    name = producer.input[0]
                init = inits.get(name)
                if init is None or init.data_type not in _FLOAT_TYPES | _INT_WEIGHT_TYPES or len(init.dims) < 2 \
                        or name in names:
                    continue
                names.append(name)
        return [self._ref(model, inits[n]) for n in names]

    def _ref(self, model: LoadedModel, init: onnx.TensorProto) -> WeightRef:
        def read() -> torch.Tensor:
            return torch.from_numpy(numpy_helper.to_array(init).copy())

        def write(new: torch.Tensor) -> None:
            dtype = numpy_helper.to_array(init).dtype
            init.CopyFrom(numpy_helper.from_array(new.detach().cpu().numpy().astype(dtype), init.name))

        return WeightRef(name=init.name, shape=tuple(int(d) for d in init.dims), read=read, write=write)

    def parameters(self, model: LoadedModel) -> list[tuple[str, torch.Tensor]]:
        """Float initializers, and in a quantized graph the stored int8/int32 values (not scales or zero points)."""
        graph = model.handle.graph
        stored = {node.input[pos] for node in graph.node for op, pos in _QUANTIZED_VALUE_INPUTS.items()
                  if node.op_type == op and len(node.input) > pos}
        qparams = {name for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                   for name in node.input[1:]}
        return [(i.name, torch.from_numpy(numpy_helper.to_array(i).copy())) for i in graph.initializer
                if i.name in stored or (i.data_type in _FLOAT_TYPES and i.name not in qparams)]

    def input_specs(self, model: LoadedModel) -> list[InputSpec]:
        inits = {i.name for i in model.handle.graph.initializer}
        specs = []
        for inp in model.handle.graph.input:
            if inp.name in inits:
                continue
            tt = inp.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                          for d in tt.shape.dim) if tt.HasField("shape") else None
            try:
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
            except Exception:
                dtype = None
            specs.append(InputSpec(inp.name, shape, dtype))
        return specs

    def _session(self, model: LoadedModel, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        # No busy-waiting between runs: the report times two sessions alternately (original, result) in one
        # process, and one session's spinning threads took the cores from the other. Measured on the bench ResNet
        # at b32, 2 cores: fp32 30.1 / int8 15.3 ms alternating with spinning, 13.8 / 5.5 ms without (alone, in
        # blocks: 14.8 / 8.0 with, 14.0 / 5.4 without).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        return ort.InferenceSession(model.handle.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def runner(self, model: LoadedModel, runtime: str, threads: int) -> Runner:
        if runtime == "openvino":
            return onnx_runner(model.handle.SerializeToString(), threads)
        if runtime != "onnxruntime":
            raise EngineError("unsupported", f"an ONNX model runs on onnxruntime or openvino, not {runtime}")
        # A fresh session each time: passes edit initializers, and a session holds its own copy.
        session = self._session(model, threads)
        names = [i.name for i in session.get_inputs()]
        first = session.get_outputs()[0].name

        def run(inputs: list[np.ndarray]) -> np.ndarray:
            out = session.run([first], dict(zip(names, inputs)))[0]
            return np.asarray(out, dtype=np.float32)

        return run
