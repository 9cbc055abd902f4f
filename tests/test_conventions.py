"""House rules (docs/architecture.md, Conventions) kept true by tests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

from testing.stack import ROOT


def test_api_starts_without_torch_or_worker():
    code = ("import sys; from app.main import create_app; create_app(); "
            "bad = [m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'worker', 'onnx', 'onnxruntime', 'openvino')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_step_spec_has_a_registered_pass():
    from app.recipes import STEP_SPECS, Step
    from worker.engine.passes import PASSES

    union = {get_args(member)[0] for member in get_args(get_args(Step)[0])}  # Annotated[Spec, Tag] members
    assert set(STEP_SPECS) == union
    assert set(STEP_SPECS) == set(PASSES)


def test_every_model_format_has_an_engine_format():
    from app.recipes import OUTPUTS_BY_INPUT
    from worker.engine.formats import registered_formats

    assert set(OUTPUTS_BY_INPUT) == set(registered_formats())


def test_settings_read_only_in_config():
    offenders = []
    for path in [*Path(ROOT, "app").rglob("*.py"), *Path(ROOT, "worker").rglob("*.py")]:
        if path.name == "config.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"os\.environ(\[|\.get)|os\.getenv", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert not offenders


def test_every_route_documents_its_errors():
    from app.main import create_app

    schema = create_app().openapi()
    missing = [f"{method.upper()} {path}" for path, ops in schema["paths"].items() for method, op in ops.items()
               if path.startswith("/v1/") and not any(code.startswith(("4", "5")) for code in op["responses"])]
    assert not missing


def test_code_cites_docs_in_the_repository_not_outside_notes():
    citing = {str(path.relative_to(ROOT)) for top in ("app", "worker") for path in Path(ROOT, top).rglob("*.py")
              if re.search(r"\b(DESIGN|FACTS)\.md\b", path.read_text())}
    assert not citing, sorted(citing)  # the facts are in bench/RESULTS.md, the rules in docs/


def test_openapi_document_is_the_committed_one():
    """tests/openapi.json is the API as served; a change to the API updates it on purpose (regenerate it with
    json.dumps(create_app().openapi(), sort_keys=True, indent=1) plus a newline)."""
    import json

    from app.main import create_app

    served = json.dumps(create_app().openapi(), sort_keys=True, indent=1) + "\n"
    assert served == Path(ROOT, "tests", "openapi.json").read_text()


MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400
# What is still over, and why: "path" for a module, "path::name" for a function (Class.method for a method).
SIZE_ALLOWED: dict[str, str] = {}


def _oversized() -> set[str]:
    import ast

    over = set()
    for path in [*Path(ROOT, "app").rglob("*.py"), *Path(ROOT, "worker").rglob("*.py")]:
        name, text = str(path.relative_to(ROOT)), path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            over.add(name)
        todo: list[tuple[str, ast.AST]] = [("", ast.parse(text))]
        while todo:
            prefix, node = todo.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qualified = prefix + child.name
                    if not isinstance(child, ast.ClassDef) and child.end_lineno - child.lineno + 1 > MAX_FUNCTION_LINES:
                        over.add(f"{name}::{qualified}")
                    todo.append((qualified + ".", child))
    return over


def test_functions_and_modules_are_short():
    over = _oversized()
    assert over <= set(SIZE_ALLOWED), sorted(over - set(SIZE_ALLOWED))
