"""The chat page in a real headless Chromium: type a message, watch the answer stream in.

Needs Playwright (python) and a Chromium binary (Debian: ``apt-get install chromium``; or set
``LLMPIPE_CHROMIUM``); without them the test skips and says which is missing.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from llmcore.checkpoint import load_checkpoint
from llmcore.generate import generate
from llmcore.instruct import response_prompt
from llmcore.tokenizer import ENCODING_DIR_ENV, ENDOFTEXT_ID, encode
from serving.app import ServeConfig, create_app
from serving.models import GENERATOR, load_served
from tests.serve_helpers import app_server, tiny_generator

CHROMIUM = os.environ.get("LLMPIPE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# Records every text the answer bubble shows, so the test can tell a stream from one final update.
OBSERVE = """() => {
  window.seen = [];
  new MutationObserver(() => {
    const answer = document.querySelector('.assistant');
    if (answer) window.seen.push(answer.textContent);
  }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
}"""


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("no Chromium binary: apt-get install chromium, or set LLMPIPE_CHROMIUM")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def test_chat_page_streams_an_answer_offline(
    browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpt2_encoding_dir: Path, tokenizer
) -> None:
    monkeypatch.setenv(ENCODING_DIR_ENV, str(gpt2_encoding_dir))
    model_dir = tiny_generator(tmp_path / "tiny-instruct")
    prompt = response_prompt({"instruction": "Name three colors.", "input": ""})
    expected = tokenizer.decode(
        generate(load_checkpoint(model_dir), [encode(tokenizer, prompt)], 40, eos_id=ENDOFTEXT_ID)[0]
    )
    # The page leaves max_tokens to the server: its cap is the answer's length.
    served = load_served(str(model_dir), GENERATOR)
    # Tokens 20 ms apart: on a loaded CI box a fast tiny model can otherwise deliver the whole answer
    # in one network chunk, and the test could not tell a stream from a single update.
    served.model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    app = create_app(served, None, ServeConfig(max_tokens=40))
    with app_server(app) as url:
        page = browser.new_page()
        outside: list[str] = []
        page.route(
            "**/*",
            lambda route: (
                route.continue_()
                if route.request.url.startswith(url)
                else (outside.append(route.request.url), route.abort())
            ),
        )
        page.goto(url)
        page.wait_for_selector("text=model: tiny-instruct")
        page.evaluate(OBSERVE)
        page.fill("#message", "Name three colors.")
        page.press("#message", "Enter")
        page.wait_for_selector(".assistant[data-done=true]", timeout=30_000)
        assert page.inner_text(".user") == "Name three colors."
        assert page.text_content(".assistant") == expected
        seen = page.evaluate("window.seen")
        partial = [text for text in seen if text and text != expected]
        assert len(partial) >= 2 and all(expected.startswith(text) for text in partial)  # it grew piece by piece
        assert outside == []  # the page needs nothing beyond this server
