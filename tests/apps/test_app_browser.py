"""app.py in a real browser: Debian's chromium + chromedriver driven by Selenium load the page, send a message and
see the reply — a calculator call and its result drawn as a "calculator" block — then save a screenshot.

Needs `apt-get install chromium chromium-driver` (CI installs them); Selenium's own browser download cannot work
offline, so both paths are given explicitly. UPDATE_APP_SCREENSHOT=1 also copies the screenshot to
docs/app_screenshot.png (the README's picture)."""

import os
import shutil

import pytest
from app_helpers import Server, fixture_tokenizer, save_checkpoint
from conftest import IN_CI, REPO

from modeling_nanochat.apps import chat_backend as cb
from modeling_nanochat.tokenizer.chat_format import render_prompt
from modeling_nanochat.generation.tool_use import generate_batch

pytestmark = pytest.mark.slow  # multi-process or end-to-end: `pytest -m "not slow"` skips it

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
QUESTION, EXPRESSION = "What is 2 + 3?", "2+3"


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        msg = f"{missing} missing: apt-get install -y chromium chromium-driver"
        pytest.fail(msg) if IN_CI else pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def wired_app(tmp_path_factory):
    """The app on a model wired to answer every question with a calculator call of EXPRESSION, greedy. Started
    with no --model in a directory whose runs/ holds that model, so it also finds its model the default way."""
    from test_tool_generation import _nanochat, wired_model

    d = tmp_path_factory.mktemp("browser")
    tok = fixture_tokenizer()
    model, _ = wired_model(_nanochat, tok, EXPRESSION)
    save_checkpoint(model, tok, d / "runs" / "calculator-demo" / "checkpoint-1")
    server = Server([str(REPO / "app.py"), "--port", "{port}", "--temperature", "0"], d / "app.log", cwd=d)
    try:
        yield server.wait(), model, tok
    finally:
        server.stop()


def test_page_chats_and_shows_the_calculator_block(browser, wired_app, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    server, model, tok = wired_app
    # the reply, independently: the tool loop's greedy tokens, split at the calculator's special tokens
    prompt = render_prompt(tok, {"messages": [{"role": "user", "content": QUESTION}]})
    (seq,), _ = generate_batch(model, tok, prompt, max_tokens=30, temperature=0.0)
    text = tok.decode(seq[len(prompt):])
    expression, output = text.split("<|python_start|>")[1].split("<|python_end|><|output_start|>")
    output = output.removesuffix("<|output_end|>")
    assert (expression, output) == (EXPRESSION, "5")

    browser.get(server.url)
    box = WebDriverWait(browser, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "textarea"))
    box.send_keys(QUESTION, Keys.ENTER)

    def reply(d):  # the calculator block, open, once its result is in (visible text only)
        page = d.find_element(By.TAG_NAME, "body").text
        return cb.TOOL_TITLE in page and f"= {output}" in page and page
    try:
        page = WebDriverWait(browser, 60).until(reply)
    except Exception:
        browser.save_screenshot(str(tmp_path / "failed.png"))
        raise AssertionError(f"no calculator block in the page (see {tmp_path / 'failed.png'}):\n"
                             f"{browser.find_element(By.TAG_NAME, 'body').text}\n{server.output()}")
    assert QUESTION in page and expression in page
    assert "runs/calculator-demo/checkpoint-1" in page  # the model it found by itself, named in the description
    shot = tmp_path / "app_screenshot.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("UPDATE_APP_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "app_screenshot.png")
