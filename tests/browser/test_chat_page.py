"""The chat page at `/` (pensieve/server/static/), in headless Chromium against a real `pensieve serve` on 127.0.0.1
over the tiny float64 model: what a person does — send, read the streamed reply and its cache line, edit an earlier
message (a branch), switch branches, stop mid-reply, reload, restart the server, give the API key — checked against
the server's records and the HF oracle. A scripted generator (the real one, its reply texts replaced) shows that
markup in a reply renders inert; axe-core finds no serious or critical accessibility violation."""

from __future__ import annotations

import dataclasses
import json
import re
from concurrent.futures import Future
from pathlib import Path

import pytest

from tests.server.common import hf_chain, hf_reply, make_model, served_tiny
from tests.tiny import oracle_copy

httpx = pytest.importorskip("httpx2")
pytest.importorskip("playwright")

from pensieve.server import ServerConfig  # noqa: E402

AXE = Path(__file__).with_name("vendor") / "axe.min.js"
MAX_OUT = 6
CONFIG = ServerConfig(model_name="tiny", max_tokens=64)


def _open(page, server, path: str = "/") -> None:
    """Load the page and set greedy sampling, MAX_OUT tokens a reply."""
    page.goto(server.url + path)
    page.wait_for_selector("body[data-ready='true']")
    _settings(page)


def _settings(page, max_tokens: int = MAX_OUT, temperature: float = 0) -> None:
    page.click("#settings summary")
    page.fill("#temperature", str(temperature))
    page.fill("#max-tokens", str(max_tokens))
    page.click("#settings summary")


def _send(page, text: str) -> None:
    """Type a message and press Enter; wait until its reply is done (the Send button is enabled again)."""
    before = page.locator("#messages .msg.assistant .stats").count()
    page.fill("#composer-input", text)
    page.press("#composer-input", "Enter")
    page.wait_for_function(
        "n => (document.querySelectorAll('#messages .msg.assistant .stats').length > n"
        " || document.querySelector('#status').textContent.startsWith('Error'))"
        " && !document.querySelector('#send').disabled",
        arg=before,
    )
    assert not page.inner_text("#status").startswith("Error"), page.inner_text("#status")


def _wait_idle(page, condition: str = "true") -> None:
    """Wait until no reply streams (Send enabled) and `condition` (JS) holds."""
    page.wait_for_function(f"() => !document.querySelector('#send').disabled && ({condition})")


def _cached_shown(page) -> list[int]:
    """The `cached N` of each reply's cache line on screen."""
    texts = page.locator("#messages .msg.assistant .stats .cached").all_inner_texts()
    return [int(re.fullmatch(r"cached (\d+)", t).group(1)) for t in texts]


def _tree(server, conv_id: str) -> dict:
    listing = httpx.get(f"{server.url}/v1/conversations/{conv_id}/responses").json()
    return {
        "data": listing["data"],
        "parents": [r["parent_response_id"] for r in listing["data"]],
        "head": listing["head_response_id"],
    }


def _conv_id(page) -> str:
    return page.evaluate("new URL(location.href).searchParams.get('c')")


def _text(response: dict) -> str:
    return "".join(c["text"] for item in response["output"] if item["type"] == "message" for c in item["content"])


def _msg(role: str, text: str) -> dict:
    return {"role": role, "content": text}


def test_send_stream_and_the_cache_line_equals_the_servers_usage(page, tokenizer):
    oracle = oracle_copy(make_model(tokenizer))
    with served_tiny(tokenizer, CONFIG) as (gen, server):
        _open(page, server)
        _send(page, "Hello there")
        _send(page, "Tell me more")
        assert page.locator("#messages .msg.user .body").all_inner_texts() == ["Hello there", "Tell me more"]
        tree = _tree(server, _conv_id(page))
        first, second = tree["data"]
        assert [_text(first), _text(second)] == hf_chain(oracle, tokenizer, ["Hello there", "Tell me more"], MAX_OUT)
        usage = [r["usage"]["input_tokens_details"]["cached_tokens"] for r in tree["data"]]
        assert _cached_shown(page) == usage and usage[1] > 0  # the second turn reused the first's KV
        assert tree["parents"] == [None, first["id"]] and tree["head"] == second["id"]
        # the list shows the chat, titled by its first message
        assert page.locator("#chat-list button").all_inner_texts() == ["Hello there"]
        # the cache panel: the device tier's blocks in use out of its 1024, and the hit rate, from /metrics
        used = gen.stats()["device_blocks_total"] - gen.stats()["device_blocks_free"]
        page.wait_for_function(  # it refreshes every 2 s
            "want => document.querySelector('#cache-figures dd')?.textContent.startsWith(want)", arg=f"{used} / 1024"
        )
        figures = dict(zip(page.locator("#cache-figures dt").all_inner_texts(),
                           page.locator("#cache-figures dd").all_inner_texts(), strict=True))  # fmt: skip
        assert figures["Device KV"].startswith(f"{used} / 1024 blocks") and used > 0
        prompt = sum(r["usage"]["input_tokens"] for r in tree["data"])
        assert figures["Hit rate"] == f"{100 * sum(usage) / prompt:.1f}%"
        gen.check_integrity()


def test_edit_an_earlier_message_branches_and_both_branches_continue(page, tokenizer):
    oracle = oracle_copy(make_model(tokenizer))
    with served_tiny(tokenizer, CONFIG) as (gen, server):
        _open(page, server)
        _send(page, "Hi, I am Ann.")
        _send(page, "What is my name?")
        # edit the second message: Edit, a new text, Enter
        page.locator("#messages .msg.user").nth(1).get_by_role("button", name="Edit").click()
        page.fill("#messages textarea[aria-label='Edit the message']", "Who am I?")
        before = len(_tree(server, _conv_id(page))["data"])
        page.press("#messages textarea[aria-label='Edit the message']", "Enter")
        _wait_idle(page, "document.querySelector('.branch-at')?.textContent === '2/2'")
        tree = _tree(server, _conv_id(page))
        assert len(tree["data"]) == before + 1
        r1, r2, b2 = tree["data"]
        assert tree["parents"] == [None, r1["id"], r1["id"]]
        branch = [_msg("user", "Hi, I am Ann."), _msg("assistant", _text(r1)), _msg("user", "Who am I?")]
        assert _text(b2) == hf_reply(oracle, tokenizer, branch, MAX_OUT)
        assert _cached_shown(page)[1] == b2["usage"]["input_tokens_details"]["cached_tokens"] > 0  # shared prefix
        _send(page, "Spell it.")  # the branch continues
        # back to the first branch (‹), and it continues too
        page.get_by_role("button", name="Previous branch").click()
        assert page.locator(".branch-at").inner_text() == "1/2"
        assert page.locator("#messages .msg.user .body").all_inner_texts() == ["Hi, I am Ann.", "What is my name?"]
        _send(page, "Thanks.")
        tree = _tree(server, _conv_id(page))
        r1, r2, b2, b3, r3 = tree["data"]
        assert tree["parents"] == [None, r1["id"], r1["id"], b2["id"], r2["id"]] and tree["head"] == r3["id"]
        assert _text(b3) == hf_chain(oracle, tokenizer, [branch, "Spell it."], MAX_OUT)[1]
        first = [*branch[:2], _msg("user", "What is my name?"), _msg("assistant", _text(r2))]
        assert _text(r3) == hf_reply(oracle, tokenizer, [*first, _msg("user", "Thanks.")], MAX_OUT)
        assert page.locator("#messages .msg.user .body").all_inner_texts() == [
            "Hi, I am Ann.", "What is my name?", "Thanks.",
        ]  # fmt: skip
        assert _cached_shown(page)[2] == r3["usage"]["input_tokens_details"]["cached_tokens"] > 0
        # the first message edited: the conversation starts afresh, a second first response (a sibling of r1)
        page.locator("#messages .msg.user").nth(0).get_by_role("button", name="Edit").click()
        page.fill("#messages textarea[aria-label='Edit the message']", "Hello, I am Bo.")
        page.press("#messages textarea[aria-label='Edit the message']", "Enter")
        _wait_idle(page, "document.querySelector('.branch-at')?.textContent === '2/2'")
        tree = _tree(server, _conv_id(page))
        root = tree["data"][-1]
        assert root["parent_response_id"] is None and tree["head"] == root["id"]
        assert _text(root) == hf_reply(oracle, tokenizer, [_msg("user", "Hello, I am Bo.")], MAX_OUT)
        assert page.locator("#messages .msg.user .body").all_inner_texts() == ["Hello, I am Bo."]
        gen.check_integrity()


def test_stop_keeps_the_partial_reply_and_the_next_turn_continues_it(page, tokenizer):
    oracle = oracle_copy(make_model(tokenizer))
    with served_tiny(tokenizer, CONFIG, step_delay=0.03) as (gen, server):
        _open(page, server)
        _send(page, "Hello there")
        _settings(page, max_tokens=60)
        page.fill("#composer-input", "Write a long story")
        page.press("#composer-input", "Enter")
        page.wait_for_function(
            "() => document.querySelectorAll('#messages .msg.assistant .body')[1]?.textContent.length > 3"
        )
        page.keyboard.press("Escape")  # Esc stops
        _wait_idle(page, "document.querySelector('.stopped .stats')")
        tree = _tree(server, _conv_id(page))
        stopped = tree["data"][1]
        assert stopped["status"] == "incomplete" and stopped["incomplete_details"] == {"reason": "cancelled"}
        kept = stopped["usage"]["output_tokens"]
        assert kept < 60 and "Stopped" in page.inner_text("#status")
        _settings(page, max_tokens=MAX_OUT)
        _send(page, "Go on.")
        tree = _tree(server, _conv_id(page))
        texts = [_text(r) for r in tree["data"]]
        turns = ["Hello there", "Write a long story", "Go on."]
        assert texts == hf_chain(oracle, tokenizer, turns, MAX_OUT, cut={1: kept})
        assert tree["parents"][2] == stopped["id"]
        cached = tree["data"][2]["usage"]["input_tokens_details"]["cached_tokens"]
        assert cached == stopped["usage"]["total_tokens"] - 1 and _cached_shown(page)[2] == cached
        gen.check_integrity()


def test_reload_and_a_server_restart_keep_the_list_and_the_branches(page, tokenizer, tmp_path):
    with served_tiny(tokenizer, CONFIG, disk_dir=tmp_path) as (_, server):
        _open(page, server)
        _send(page, "First chat")
        page.click("#new-chat")
        _send(page, "Second chat")
        _send(page, "More")
        page.locator("#messages .msg.assistant").nth(1).get_by_role("button", name="Regenerate").click()
        _wait_idle(page, "document.querySelector('.branch-at')?.textContent === '2/2'")
        conv = _conv_id(page)
        shown = page.locator("#messages").inner_text()
        page.reload()
        page.wait_for_selector("body[data-ready='true']")
        assert page.locator("#chat-list button").all_inner_texts() == ["Second chat", "First chat"]
        assert page.locator(".branch-at").inner_text() == "2/2" and page.locator("#messages").inner_text() == shown
    with served_tiny(tokenizer, CONFIG, disk_dir=tmp_path) as (_, server):  # a new server, a new port
        _open(page, server, f"/?c={conv}")
        assert page.locator("#chat-list button").all_inner_texts() == ["Second chat", "First chat"]
        assert page.locator(".branch-at").inner_text() == "2/2" and page.locator("#messages").inner_text() == shown
        page.get_by_role("button", name="Previous branch").click()
        assert page.locator(".branch-at").inner_text() == "1/2"
        _send(page, "After the restart")
        tree = _tree(server, conv)
        assert tree["data"][-1]["usage"]["input_tokens_details"]["cached_tokens"] > 0  # its KV came back from disk


def test_the_page_asks_for_the_api_key_and_keeps_it_in_the_tab(page, tokenizer):
    config = dataclasses.replace(CONFIG, api_key="sk-page")
    with served_tiny(tokenizer, config) as (_, server):
        page.goto(server.url + "/")  # the page itself needs no key
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "sk-page")
        page.press("#key-input", "Enter")
        page.wait_for_selector("body[data-ready='true']")
        assert page.inner_text("#model") == "tiny"
        assert page.evaluate("sessionStorage.getItem('pensieve.apiKey')") == "sk-page"
        assert "sk-page" not in page.evaluate("JSON.stringify(localStorage)")  # the key stays in the tab
        _settings(page)
        _send(page, "Hello")
        assert len(page.locator("#messages .msg.assistant").all()) == 1
        assert httpx.get(server.url + "/v1/models").status_code == 401  # the API still wants it


class ScriptedText:
    """The server's Generator with every reply's text replaced by `text` (its tokens stay the model's): a reply a
    tiny random model never writes, through the same protocol the server takes."""

    def __init__(self, gen, text: str) -> None:
        self._gen, self.text = gen, text

    def __getattr__(self, name):
        return getattr(self._gen, name)

    def submit(self, conv_id, prompt, sampling=None, on_token=None, *, tools=None):
        first = [True]

        def scripted(delta):
            text, first[0] = (self.text if first[0] else ""), False
            on_token(dataclasses.replace(delta, text=text))

        inner = self._gen.submit(conv_id, prompt, sampling, on_token=scripted if on_token else None, tools=tools)
        outer: Future = Future()
        outer.turn_future = getattr(inner, "turn_future", inner)  # abort / stop find the turn through it

        def settle(done: Future) -> None:
            error = done.exception()
            outer.set_exception(error) if error else outer.set_result(
                dataclasses.replace(done.result(), text=self.text)
            )

        inner.add_done_callback(settle)
        return outer


HOSTILE = (
    'Hi <script>window.__pwned = "script"</script> <img src=x onerror="window.__pwned = \'onerror\'"> '
    "<a href=\"javascript:window.__pwned='href'\">link</a> **bold** and `code` "
    '<textarea id="composer-input">shadow</textarea><p id="status" name="send" style="color:red">clobber</p>'
)


def _raw_get(server, path: str) -> int:
    """The status of GET path, the path sent byte for byte."""
    import http.client

    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


def test_markup_in_a_reply_renders_inert_under_the_csp(page, tokenizer):
    with served_tiny(tokenizer, CONFIG, wrap=lambda gen: ScriptedText(gen, HOSTILE)) as (_, server):
        index = httpx.get(server.url + "/")
        csp = index.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
        for path in ("/static/%2e%2e/pyproject.toml", "/static/..%2f..%2fpyproject.toml", "/static/nope.js",
                     "/static/", "/static/vendor"):  # fmt: skip
            assert _raw_get(server, path) == 404, path  # sent as is (an HTTP client would normalize the dots)
        assert _raw_get(server, "/static/app.js") == 200
        _open(page, server)
        _send(page, "Say something")
        page.wait_for_timeout(300)  # (an onerror would have fired by now)
        reply = page.locator("#messages .msg.assistant .body")
        assert page.evaluate("window.__pwned") is None
        assert reply.locator("script").count() == 0
        assert reply.locator("strong").inner_text() == "bold" and reply.locator("code").inner_text() == "code"
        img = reply.locator("img")
        assert img.count() == 0 or img.get_attribute("onerror") is None
        links = reply.locator("a")
        assert links.count() == 0 or not (links.get_attribute("href") or "").startswith("javascript")
        # no element of a reply carries an id, a name or a style, and no form control: the page's own stay its own
        assert reply.locator("[id], [name], [style], textarea, input, form, button").count() == 0
        _send(page, "Again")  # the composer still is the page's (a reply's textarea could have shadowed it)
        assert page.locator("#messages .msg.user .body").all_inner_texts() == ["Say something", "Again"]
        page.reload()  # the stored reply, rendered again from the server's record
        page.wait_for_selector("#messages .msg.assistant .body strong")
        assert page.evaluate("window.__pwned") is None


@pytest.mark.parametrize("scheme, width", [("light", 1280), ("dark", 390)])
def test_no_serious_accessibility_violations_and_phone_width(browser, tokenizer, scheme, width):
    context = browser.new_context(viewport={"width": width, "height": 860}, color_scheme=scheme)
    page = context.new_page()
    try:
        with served_tiny(tokenizer, CONFIG) as (_, server):
            _open(page, server)
            _send(page, "Hello there")
            _send(page, "And again")
            page.locator("#messages .msg.assistant").nth(1).get_by_role("button", name="Regenerate").click()
            page.wait_for_function(
                "() => document.querySelector('.branch-at') && !document.querySelector('#send').disabled"
            )
            page.evaluate(AXE.read_text())  # through the DevTools protocol: the page's CSP allows no inline script
            result = page.evaluate("async () => JSON.stringify(await axe.run(document))")
            bad = [v for v in json.loads(result)["violations"] if v["impact"] in ("serious", "critical")]
            assert not bad, [(v["id"], v["help"], [n["target"] for n in v["nodes"]]) for v in bad]
            assert page.evaluate("document.documentElement.scrollWidth") <= width  # no sideways scrolling
            assert page.locator("#composer-input").is_visible()
    finally:
        context.close()


def test_json_schema_mode_and_a_system_prompt(page, tokenizer):
    """Settings: a system prompt for new chats (sent as instructions) and a JSON schema the reply follows."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"], "additionalProperties": False}
    with served_tiny(tokenizer, CONFIG) as (gen, server):
        _open(page, server)
        _settings(page, max_tokens=40)
        page.click("#settings summary")
        page.fill("#system-prompt", "Answer in JSON.")
        page.check("#json-mode")
        page.fill("#json-schema", json.dumps(schema))
        page.click("#settings summary")
        _send(page, "Give me a.")
        (response,) = _tree(server, _conv_id(page))["data"]
        assert response["text"]["format"]["type"] == "json_schema" and response["instructions"] == "Answer in JSON."
        jsonschema.validate(json.loads(_text(response)), schema)
        assert page.locator("#messages .msg.assistant .body").inner_text().strip() == _text(response).strip()
        page.click("#settings summary")
        page.fill("#json-schema", "{not json")
        page.click("#settings summary")
        page.fill("#composer-input", "Again")
        page.press("#composer-input", "Enter")
        page.wait_for_function("() => document.querySelector('#status').textContent.includes('does not parse')")
        assert len(_tree(server, _conv_id(page))["data"]) == 1  # nothing was sent, the message stays in the box
        assert page.input_value("#composer-input") == "Again"
        gen.check_integrity()
