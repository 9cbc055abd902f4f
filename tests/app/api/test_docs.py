"""/docs and /redoc work offline: in headless Chromium against a real server, each page renders the operations list
from assets the server itself serves, with no request leaving it and no Content-Security-Policy violation."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest

from app.api.docs import ASSETS, PREFIX
from tests.test_dashboard import browser  # noqa: F401  (the headless Chromium fixture)

OPERATION = "/v1/models/{ident}"  # a path both pages list


@pytest.fixture
def server(stack_factory):
    stack = stack_factory("sqlite")
    stack.start_api()
    return stack


def _open(browser, url: str) -> tuple[object, list[str], list[str]]:  # noqa: F811
    """A page at url, recording console errors (CSP violations among them) and every request to another origin."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    outside: list[str] = []
    origin = urlsplit(url).netloc
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda req: outside.append(req.url)
            if urlsplit(req.url).scheme in ("http", "https") and urlsplit(req.url).netloc != origin else None)
    page.route(lambda u: urlsplit(u).scheme in ("http", "https") and urlsplit(u).netloc != origin,
               lambda route: route.abort())  # offline: nothing outside the server answers
    page.goto(url)
    return page, errors, outside


def _settle(page) -> None:
    """Lets late requests and console messages (a worker, an image) arrive before the checks."""
    page.wait_for_load_state("networkidle")
    time.sleep(0.5)


def test_swagger_ui_renders_offline(server, browser):  # noqa: F811
    page, errors, outside = _open(browser, f"{server.url}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert OPERATION in [p.replace("\u200b", "") for p in paths], paths[:10]
    page.locator(".opblock-summary-path", has_text="/v1/keys").first.click()  # an operation opens: the UI runs
    page.wait_for_selector(".opblock.is-open .opblock-body", timeout=10_000)
    _settle(page)
    assert not errors, errors
    assert not outside, outside


def test_redoc_renders_offline(server, browser):  # noqa: F811
    page, errors, outside = _open(browser, f"{server.url}/redoc")
    page.wait_for_selector("[data-section-id^='tag/']", timeout=30_000)
    page.get_by_text(OPERATION).first.wait_for(state="attached", timeout=30_000)
    assert page.locator("h2", has_text="Upload").count() >= 1  # POST /v1/models, summary "Upload"
    _settle(page)
    assert not errors, errors
    assert not outside, outside


def test_docs_pages_allow_only_their_own_assets(server):
    import httpx

    pages = {path: httpx.get(f"{server.url}{path}") for path in ("/docs", "/redoc")}
    for path, r in pages.items():
        assert r.status_code == 200, r.text
        csp = r.headers["content-security-policy"]
        assert csp.startswith("default-src 'none'; script-src 'self'") and "connect-src 'self'" in csp, csp
        assert not any(word in csp for word in ("unsafe-inline", "unsafe-eval", "http", "*")), csp
        assert f'src="{PREFIX}/' in r.text and "cdn" not in r.text.lower(), r.text
    assert "script-src 'self' 'sha256-" in pages["/docs"].headers["content-security-policy"]  # its inline init
    for name, kind in ASSETS.items():
        r = httpx.get(f"{server.url}{PREFIX}/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.content) > 1000, name
        assert b"cdn.redoc.ly" not in r.content, name
    r = httpx.get(f"{server.url}{PREFIX}/..%2F..%2Fpyproject.toml")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
