"""Model packages: a zip with model.py (build_model()), weights.safetensors and optional example inputs."""

from __future__ import annotations

import importlib.util
import itertools
import json
import stat
import sys
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from worker.engine.errors import EngineError
from worker.engine.formats import _torch
from worker.engine.formats.base import InputSpec, LoadedModel, ModelFormat, Runner, WeightRef, register

MODEL_PY = "model.py"
WEIGHTS = "weights.safetensors"
EXAMPLES = "example_inputs.safetensors"
QUANTIZATION = "quantization.json"  # written for eagerly quantized weights (formats/_quantized.py)
_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_counter = itertools.count()


def _extract_checked(path: Path, dest: Path, label: str = "model package") -> Path:
    """Extract the zip into `dest`, refusing entries that escape it or are links; returns `dest`."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise EngineError("bad_model", f"{path.name} is not a zip {label}: {exc}") from exc
    with zf:
        for info in zf.infolist():
            parts = PurePosixPath(info.filename).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts or "\\" in info.filename or ":" in info.filename:
                raise EngineError("bad_model", f"package entry {info.filename!r} escapes the package folder")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise EngineError("bad_model", f"package entry {info.filename!r} is a symlink")
        zf.extractall(dest)
    return dest


def _extract(path: Path, dest: Path) -> Path:
    """Extract the zip safely and return the folder holding model.py (the root or its single top folder)."""
    _extract_checked(path, dest)
    if (dest / MODEL_PY).is_file():
        return dest
    tops = [p for p in dest.iterdir() if p.name != "__MACOSX"]
    if len(tops) == 1 and tops[0].is_dir() and (tops[0] / MODEL_PY).is_file():
        return tops[0]
    raise EngineError("bad_model", f"the package has no {MODEL_PY} at its root")


@register
class PackageFormat(ModelFormat):
    name = "package"
    suffix = ".zip"
    runtimes = ("torch", "torch-compile")

    def load(self, path: Path, workdir: Path) -> LoadedModel:
        folder = _extract(path, workdir / f"package-{next(_counter)}")
        if not (folder / WEIGHTS).is_file():
            raise EngineError("bad_model", f"the package has no {WEIGHTS}")
        # A unique module name: the original and the re-loaded result live in the same process.
        mod_name = f"squeeze_user_model_{next(_counter)}"
        try:
            spec = importlib.util.spec_from_file_location(mod_name, folder / MODEL_PY)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
            build = getattr(module, "build_model", None)
            if not callable(build):
                raise EngineError("bad_model", f"{MODEL_PY} does not define build_model()")
            net = build()
        except EngineError:
            raise
        except BaseException as exc:  # user code: SystemExit included
            raise EngineError("bad_model", f"{MODEL_PY} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(net, torch.nn.Module):
            raise EngineError("bad_model", f"build_model() returned {type(net).__name__}, not a torch.nn.Module")
        quantized = None
        try:
            state = load_file(str(folder / WEIGHTS))
            if (folder / QUANTIZATION).is_file():  # int8/int4 weights of an eagerly quantized model
                from worker.engine.formats import _quantized

                quantized = json.loads((folder / QUANTIZATION).read_text(encoding="utf-8"))
                _quantized.restore_state(net, state, quantized)
            else:
                net.load_state_dict(state, strict=True)
        except Exception as exc:
            raise EngineError("bad_model", f"{WEIGHTS} does not match build_model(): {type(exc).__name__}: "
                                           f"{exc}") from exc
        net.eval()
        examples = None
        if (folder / EXAMPLES).is_file():
            try:
                raw = load_file(str(folder / EXAMPLES))
                keys = sorted(raw, key=lambda k: int(k.split("_")[-1]) if k.split("_")[-1].isdigit() else 1 << 30)
                examples = [raw[k].numpy() for k in keys]
            except Exception as exc:
                raise EngineError("bad_model", f"cannot read {EXAMPLES}: {exc}") from exc
        extra = {"folder": folder, "examples": examples}
        if quantized is not None:
            extra["quantized"] = {k: quantized[k] for k in ("method", "modules", "per_channel")}
        return LoadedModel(format=self.name, path=path, handle=net, extra=extra)

    def save(self, model: LoadedModel, path: Path) -> None:
        changed = model.extra.get("architecture_changed")
        if changed:
            raise EngineError("unsupported", f"{changed} changed the architecture, so the package's build_model() "
                                             "no longer fits the weights: write pt2 or onnx instead")
        folder: Path = model.extra["folder"]
        manifest = None
        if model.extra.get("quantized"):  # int8/int4 modules: stored as integers + quantization.json
            from worker.engine.formats import _quantized

            state, manifest = _quantized.saved_state(model.handle, model.extra["quantized"])
        else:
            # Clones: safetensors refuses tensors that share storage (tied weights).
            state = {k: v.detach().contiguous().clone() for k, v in model.handle.state_dict().items()}
        tmp = path.with_suffix(".weights.tmp")
        save_file(state, str(tmp))
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(folder.rglob("*")):
                rel = f.relative_to(folder).as_posix()
                if f.is_file() and rel not in (WEIGHTS, QUANTIZATION) and "__pycache__" not in rel:
                    zf.write(f, rel)
            zf.write(tmp, WEIGHTS)
            if manifest is not None:
                zf.writestr(QUANTIZATION, json.dumps(manifest, indent=1, sort_keys=True))
        tmp.unlink()

    def export(self, model: LoadedModel, target: str, path: Path, examples: list[np.ndarray] | None) -> list[str]:
        if target == self.name:
            self.save(model, path)
            return []
        examples = self.example_inputs(model) or examples
        if examples is None:
            raise EngineError("bad_dataset", f"writing a package as {target} needs example inputs: add "
                                             f"{EXAMPLES} to the package or give an eval dataset")
        if target == "onnx":
            return _torch.export_onnx(model.handle, examples, path, dynamic_batch=True)
        if target == "pt2":
            return self._export_pt2(model.handle, examples, path)
        raise EngineError("unsupported", f"a package cannot be written as {target}")

    def _export_pt2(self, net: torch.nn.Module, examples: list[np.ndarray], path: Path) -> list[str]:
        args = _torch.to_tensors(_torch.batch_of(examples))
        dynamic = tuple({0: torch.export.Dim("batch")} for _ in args)
        try:
            ep = torch.export.export(net, args, dynamic_shapes=dynamic)
            notes = ["pt2: exported with a dynamic batch dim"]
        except Exception as exc:
            try:
                ep = torch.export.export(net, args)
            except Exception as exc2:
                raise EngineError("unsupported", f"torch.export failed: {type(exc2).__name__}: {exc2}") from exc2
            notes = [f"pt2: dynamic batch export failed ({type(exc).__name__}); exported with a fixed batch "
                     f"of {args[0].shape[0]}"]
        torch.export.save(ep, str(path))
        return notes

    def eligible_weights(self, model: LoadedModel) -> list[WeightRef]:
        refs, seen = [], set()
        for mod_name, mod in model.handle.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, _LAYER_TYPES) and isinstance(w, torch.nn.Parameter) and w.ndim >= 2 \
                    and id(w) not in seen:
                seen.add(id(w))
                refs.append(_torch.tensor_ref(f"{mod_name}.weight" if mod_name else "weight", w))
            elif _torch.is_dynamic_quantized(mod):  # read-only: the dequantized int8 weight
                refs.append(_torch.dynamic_quantized_ref(f"{mod_name}.weight" if mod_name else "weight", mod))
        return refs

    def parameters(self, model: LoadedModel) -> list[tuple[str, torch.Tensor]]:
        """Learnable tensors; quantized weights (torchao tensors, dynamic int8 Linear) as their dequantized values."""
        params = [(n, _torch.plain(t)) for n, t in model.handle.named_parameters()]
        for mod_name, mod in model.handle.named_modules():
            if _torch.is_dynamic_quantized(mod):
                w, b = mod._weight_bias()
                params.append((f"{mod_name}.weight", w.dequantize()))
                if b is not None:
                    params.append((f"{mod_name}.bias", b.detach()))
        return params

    def example_inputs(self, model: LoadedModel) -> list[np.ndarray] | None:
        return model.extra.get("examples")

    def input_specs(self, model: LoadedModel) -> list[InputSpec] | None:
        examples = self.example_inputs(model)
        if examples is None:
            return None
        return [InputSpec(f"input_{i}", (None, *a.shape[1:]), a.dtype) for i, a in enumerate(examples)]

    def runner(self, model: LoadedModel, runtime: str, threads: int) -> Runner:
        return _torch.module_runner(model.handle, threads, runtime)

