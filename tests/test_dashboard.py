"""The dashboard in headless Chromium (Debian's chromium driven by playwright) against a real server and worker:
sign in with a key, watch a job finish in the jobs table without a reload, open the job page (numbers, report
image, artifacts) and the model page. SQUEEZE_WRITE_DOCS=1 also saves the job page screenshot to docs/."""

from __future__ import annotations

import os
import shutil

import pytest

from testing import modelzoo
from tests.conftest import REQUIRE_SERVICES, new_team_key
from testing.stack import ROOT, wait_for
from tests.test_e2e import FAST_REAPER, SLOW_MLP_SOURCE, upload

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser():
    """Debian's chromium (playwright's own browser download is not needed). Required in CI, skipped elsewhere."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or CHROMIUM is None:
        missing = "playwright" if sync_playwright is None else "chromium (apt-get install chromium)"
        if REQUIRE_SERVICES:
            pytest.fail(f"{missing} is not installed; required in CI")
        pytest.skip(f"{missing} is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def _wait_image(page, element_id: str, timeout: float = 30.0) -> None:
    """Polls from here: the page's CSP forbids the eval that playwright's wait_for_function would need."""
    import time

    deadline = time.monotonic() + timeout
    script = f"() => {{ const e = document.getElementById('{element_id}'); return !!e && e.naturalWidth > 0; }}"
    while not page.evaluate(script):
        assert time.monotonic() < deadline, f"#{element_id} never loaded"
        time.sleep(0.2)


def test_dashboard_shows_a_job_finish_live_and_its_report(stack_factory, browser, tmp_path):
    x_train, y_train, x_test, y_test = modelzoo.digits_split()
    mlp = modelzoo.train_mlp(epochs=5)
    stack = stack_factory("sqlite", **FAST_REAPER)
    stack.start_api()
    stack.start_worker(concurrency=1)
    key = new_team_key(stack.admin, "dashboard")
    client = stack.client(key)
    # A package that sleeps 3 s while building: the job is visibly running before it succeeds.
    slow = modelzoo.write_package(mlp, tmp_path / "slow.zip", SLOW_MLP_SOURCE.format(seconds=3))
    model = upload(client, "models", slow)
    eval_ds = upload(client, "datasets", modelzoo.write_npz(tmp_path / "eval.npz", x_test, y_test))

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{stack.url}/dashboard")
    page.fill("input[name=key]", key)
    page.click("button[type=submit]")
    page.wait_for_selector("table#jobs")
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads

    job = client.post("/v1/jobs", json={"model_id": model["id"], "datasets": {"eval": eval_ds["id"]},
                                        "recipe": {"steps": [{"type": "prune", "sparsity": 0.5}],
                                                   "outputs": ["pt2", "safetensors"],
                                                   "evaluate": {"repeats": 3}}}).json()
    row = f"tr[data-job='{job['id']}']"
    page.wait_for_selector(f"{row}[data-status=running]", timeout=60_000)
    page.wait_for_selector(f"{row}[data-status=succeeded]", timeout=120_000)
    assert page.evaluate("window.__sameDocument") is True  # updated in place, no reload
    done = wait_for(client, job["id"], timeout=10)
    ratio = max(done["metrics"]["ratios"]["size"], done["metrics"]["ratios"]["safetensors_size"])

    page.click(f"{row} a[href='#/jobs/{job['id']}']")
    page.wait_for_selector("#size-ratio")
    assert page.inner_text("#size-ratio") == f"{ratio:.2f}x"
    _wait_image(page, "report-png")
    assert {"model.pt2", "model.safetensors", "report.json", "report.png"} <= \
        set(page.eval_on_selector_all("#artifacts a", "els => els.map(e => e.dataset.name)"))
    shot = tmp_path / "dashboard-job.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    if os.environ.get("SQUEEZE_WRITE_DOCS") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "dashboard-job.png")

    page.click(f"a[href='#/models/{model['id']}']")
    page.wait_for_selector(f"a[href='#/jobs/{job['id']}']")
    _wait_image(page, "pareto-png")
    assert not errors, errors

    # A wrong key is sent back to the sign-in form.
    other = browser.new_page()
    other.goto(f"{stack.url}/dashboard")
    other.fill("input[name=key]", "sqz_wrong")
    other.click("button[type=submit]")
    other.wait_for_selector("form.login")


XSS = "<img src=x onerror=window.__pwned=1>"  # fits every column it is written to (error_code: 64)


def _hostile_metrics() -> dict:
    """Metrics shaped as the engine writes them, with the sandbox's strings where it chooses them."""
    lat = {XSS: {"1": {"median": 1.0}}}
    return {"original": {"size_bytes": 4096, "accuracy": 0.9, "latency_ms": lat},
            "compressed": {"size_bytes": 2048, "accuracy": 0.8, "agreement": 0.95, "cosine": XSS,
                           "latency_ms": lat},
            "ratios": {"size": 2.0, "macs": 1.5, "latency": {XSS: {"1": 1.2}}},
            "flags": [XSS], "guard": {"passed": False, "checks": [{"bound": XSS, "limit": XSS, "measured": XSS,
                                                                    "passed": False}]}}


def _make_hostile(database_url: str, job_id: str) -> None:
    """What a hostile sandbox can make the worker record: stage, error, metrics, events, artifact names."""
    from sqlalchemy.orm import Session

    from app.core.db import make_engine, new_id, utcnow
    from app.core.tables import Artifact, Job, JobEvent

    engine = make_engine(database_url)
    with Session(engine) as db:
        job = db.get(Job, job_id)
        job.status, job.stage, job.progress, job.finished_at = "failed", XSS, 1.0, utcnow()
        job.error_code, job.error_message, job.metrics = XSS, f"boom {XSS}", _hostile_metrics()
        db.add(JobEvent(job_id=job_id, type=XSS, message=XSS, data={}))
        db.add(Artifact(id=new_id("art"), job_id=job_id, name=f"{XSS}.onnx", format="onnx", size_bytes=1,
                        sha256="0" * 64))
        db.commit()
    engine.dispose()


def _assert_inert(page, selector: str) -> None:
    """The payload is shown as text and made no element; with the page's CSP bypassed, nothing ran either."""
    page.wait_for_selector(selector)
    assert XSS in page.inner_text("#view")
    assert page.eval_on_selector_all("#view img[src='x'], #view [onerror]", "els => els.length") == 0
    assert page.evaluate("window.__pwned") is None


def test_dashboard_shows_sandbox_values_as_text(stack_factory, browser):
    from tests.app.api.routes.test_api import tiny_onnx, upload_model

    stack = stack_factory("sqlite")
    stack.start_api()
    key = new_team_key(stack.admin, "mallory")
    client = stack.client(key)
    model = upload_model(client, tiny_onnx(), name=XSS).json()
    assert model["name"] == XSS
    job = client.post("/v1/jobs", json={"model_id": model["id"], "recipe": "prune-50"}).json()
    _make_hostile(stack.backend.database_url, job["id"])

    # The page's CSP would block an inline handler anyway: bypass it, so the test attacks the escaping itself.
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{stack.url}/dashboard")
    page.fill("input[name=key]", key)
    page.click("button[type=submit]")
    _assert_inert(page, f"tr[data-job='{job['id']}'][data-status=failed]")
    page.click(f"a[href='#/jobs/{job['id']}']")
    _assert_inert(page, "#artifacts a")
    assert page.inner_text("#size-ratio") == "2.00x"
    assert page.eval_on_selector_all("#artifacts a", "els => els.map(e => e.dataset.name)") == [f"{XSS}.onnx"]
    page.click(f"a[href='#/models/{model['id']}']")
    _assert_inert(page, "h2:has-text('Model')")
    assert not errors, errors
    context.close()


def test_dashboard_assets_are_an_allowlist(api):
    assert api.get("/dashboard").status_code == 200
    assert "text/javascript" in api.get("/dashboard/static/dashboard.js").headers["content-type"]
    for name in ("dashboard.html", "..%2Fconfig.py", "x.js"):
        assert api.get(f"/dashboard/static/{name}").status_code == 404
    assert api.get("/", follow_redirects=False).headers["location"] == "/dashboard"


def test_dashboard_markup_reaches_the_page_in_one_place():
    """Only show() writes markup, and it takes html`` output only: a new view cannot skip the escaping."""
    import re

    js = (ROOT / "app" / "dashboard" / "dashboard.js").read_text()
    assert len(re.findall(r"\.innerHTML\s*=", js)) == 1 and "view.innerHTML = markup.text;" in js
    for sink in ("outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink

