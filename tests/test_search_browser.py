"""The search page in a real headless browser: Debian's chromium driven by Playwright (.ci/run installs both)."""
import shutil
import threading

import pytest
import torch

from conftest import TINY_VIT

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    pytest.importorskip("usearch")
    from distill import create_student
    from distill.demo import make_shapes
    from distill.search import Searcher, index_photos
    from distill.search.serve import make_server

    root = tmp_path_factory.mktemp("page")
    data = make_shapes(root / "data", n_train=30, n_test=4, size=32, seed=2)
    torch.manual_seed(0)
    create_student("vit_tiny+bert_small", embed_dim=32, image_kwargs={"image_size": 32, "model_kwargs": dict(TINY_VIT)},
                   text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "context_length": 16}
                   ).save(root / "student")
    index_photos(data / "images", root / "ix", root / "student", progress=False)
    searcher = Searcher(root / "ix")
    server = make_server(searcher, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/", searcher
    server.shutdown()
    server.server_close()


def test_typing_a_query_shows_the_expected_photos_with_scores(page_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium (.ci/run installs it: apt-get install chromium)")
    url, searcher = page_server
    query = "a large green triangle at the top"
    want = searcher.text(query, k=24).hits  # what the library answers; the page must show the same
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url)
        assert "34 photos indexed by student" in page.inner_text("#status")  # 30 + 4 images
        page.fill("#q", query)
        page.press("#q", "Enter")
        page.wait_for_selector("figure.hit")
        shown = page.eval_on_selector_all("figure.hit", "els => els.map(e => e.dataset.path)")
        captions = page.eval_on_selector_all("figure.hit figcaption", "els => els.map(e => e.textContent)")
        assert shown[0] == want[0].path and shown[:5] == [h.path for h in want[:5]]
        assert float(captions[0].split()[0]) == pytest.approx(want[0].score, abs=1e-3)
        # every thumbnail loaded (an image the browser decoded, not a broken link)
        page.wait_for_function("() => [...document.querySelectorAll('figure.hit img')].every(i => i.complete)")
        widths = page.eval_on_selector_all("figure.hit img", "els => els.map(e => e.naturalWidth)")
        assert all(w > 0 for w in widths)
        # a click on a photo shows photos like it, itself first
        page.click("figure.hit >> nth=2")
        page.wait_for_function(f"() => document.querySelector('figure.hit')?.dataset.path === {shown[2]!r}")
        assert "photos like" in page.inner_text("#status")
        browser.close()
