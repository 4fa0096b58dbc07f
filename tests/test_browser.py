"""The page in a real browser: Playwright driving Debian's chromium (never a browser Playwright downloads)."""
import shutil

import pytest

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install "
                                    "chromium)")


def served(run):
    from sonocad.serve.app import create_app, serve_in_background

    url, srv = serve_in_background(create_app(run))
    return url, srv


@pytest.fixture(scope="module")
def server(tiny_run):
    url, srv = served(tiny_run)
    yield url
    srv.should_exit = True


def upload_through_the_page(url: str, scan, screenshot) -> dict:
    """Open the page, wait for the model card, upload `scan`, wait for the result; what the page showed."""
    outside = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: None if r.url.startswith((url, "data:")) else outside.append(r.url))
            page.goto(url + "/")
            page.wait_for_selector("#card table", timeout=30_000)
            shown = {"notice": page.inner_text("#notice"), "card": page.inner_text("#card"),
                     "site_notice": page.inner_text("#site-notice") if page.is_visible("#site-notice") else None,
                     "points": page.eval_on_selector_all("#card-points tr", "rows => rows.length")}
            page.set_input_files("#file", str(scan))
            page.wait_for_selector("#result:not([hidden])", timeout=120_000)
            shown["prob"] = float(page.inner_text("#prob"))
            shown["decisions"] = page.inner_text("#decisions")
            for img in ("heatmap", "outline"):
                shown[img] = page.eval_on_selector(f"#{img}", "img => !img.hidden && img.complete && img.naturalWidth > 0")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert not outside, outside
    return shown


@needs_chromium
def test_upload_a_scan_through_the_page(server, phantoms, tmp_path):
    import httpx

    scan = phantoms / "malignant" / "malignant (5).png"
    shown = upload_through_the_page(server, scan, tmp_path / "page.png")
    assert "not a diagnostic device" in shown["notice"]
    assert shown["heatmap"] and shown["outline"]               # where it looked, and the lesion it outlines
    assert "sonocad adapt" in shown["site_notice"]            # thresholds from its own validation part
    api = httpx.post(server + "/api/predict", files={"file": (scan.name, scan.read_bytes(), "image/png")},
                     timeout=60).json()
    assert shown["prob"] == pytest.approx(round(api["probability"], 4), abs=1e-4)
    assert (tmp_path / "page.png").stat().st_size > 10_000


@needs_chromium
def test_bus_base_card_shows_its_figures_and_the_outline(phantoms, tmp_path):
    url, srv = served("bus-base")
    try:
        shown = upload_through_the_page(url, phantoms / "malignant" / "malignant (5).png", tmp_path / "bus-base.png")
    finally:
        srv.should_exit = True
    card = shown["card"]
    assert "measured on the held-out test part of both sites" in card and "AUC 0.8" in card and "n/a" not in card
    assert "BUSI" in card and "BUS-BRA" in card                     # each site's test part too
    assert shown["points"] == 4                                       # a header and three operating points
    assert "promises" in shown["decisions"] or "\u2265" in shown["decisions"]
    assert shown["outline"] and "sonocad adapt bus-base" in shown["site_notice"]
