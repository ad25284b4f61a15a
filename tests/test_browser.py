"""The playground and /docs in a real headless Chromium, against the Procfile's gunicorn (tiny
model, private Redis) with API keys on: every request the pages make must carry the key the user
gave, or it would fail. Each test also reads the browser's console and fails on errors."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from servers import Gunicorn, RedisServer, serving

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
if not CHROMIUM.exists():
    pytest.skip(
        "browser tests need Debian's chromium and chromium-driver (/usr/bin/chromium is missing): "
        "`sudo apt-get install chromium chromium-driver` (.ci/run installs them)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402 - only once we know there is a browser to drive
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.chrome.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

KEY = "browser-test-key"
KEY_STORAGE = "lstm-lm.api-key"  # what the playground's key field is remembered under
# The network is closed here: without these Chromium stalls on first-run work and updates.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)


@pytest.fixture(scope="module")
def server(
    char_lm_dir: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    redis_server.client().flushall()
    with serving(
        char_lm_dir,
        tmp_path_factory.mktemp("gunicorn-browser"),
        redis_server.url,
        WEB_CONCURRENCY="1",
        GUNICORN_THREADS="16",
        MAX_TOKENS_LIMIT="200000",  # room for a generation long enough to stop
        API_KEYS=KEY,
    ) as g:
        yield g


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    if not CHROMEDRIVER.exists():
        pytest.fail(f"{CHROMIUM} is installed but {CHROMEDRIVER} is not: `apt-get install chromium-driver`")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for get_log("browser")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class Page:
    """The browser on one server: open pages, read the DOM and the console, ask the API directly."""

    def __init__(self, driver: WebDriver, server: Gunicorn):
        self.driver, self.server = driver, server
        driver.get_log("browser")  # drain what earlier tests left

    def open(self, path: str = "/", key: str | None = KEY) -> None:
        """Open a page as a returning user whose key (if any) the playground remembered."""
        self.driver.get(f"{self.server.base}/health")  # same origin, so its localStorage can be set
        if key is None:
            self.driver.execute_script("window.localStorage.clear()")
        else:
            self.driver.execute_script("window.localStorage.setItem(arguments[0], arguments[1])", KEY_STORAGE, key)
        self.driver.get(f"{self.server.base}{path}")

    def wait(self, condition: Callable[[], Any], timeout: float = 30, what: str = "the page") -> Any:
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda _: condition())
        except TimeoutException:
            status, error = self.text("status"), self.text("error")
            raise TimeoutException(f"timed out waiting for {what} (status {status!r}, error {error!r})") from None

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def by_id(self, element_id: str) -> Any:
        return self.driver.find_element(By.ID, element_id)

    def text(self, element_id: str) -> str:
        return str(self.js("return document.getElementById(arguments[0]).textContent", element_id))

    def set_value(self, element_id: str, value: str) -> None:
        field = self.by_id(element_id)
        field.clear()
        field.send_keys(value)

    def session_id(self) -> str:
        return str(self.by_id("session-info").get_attribute("data-session-id"))

    def wait_finished(self, previous: str = "") -> str:
        """Wait for a generation to end; returns the status line."""
        self.wait(
            lambda: self.text("status") != previous and not self.text("status").startswith("generating"),
            what="the generation to end",
        )
        status = self.text("status")
        assert status.startswith("finished"), (status, self.text("error"))
        return status

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {KEY}"}
        return requests.request(method, f"{self.server.base}{path}", json=body, headers=headers, timeout=30)

    def session_tokens(self, session_id: str) -> int:
        return int(self.api("GET", f"/sessions/{session_id}").json()["tokens"])

    def console_errors(self, allowed: tuple[str, ...] = ()) -> list[str]:
        return [
            e["message"]
            for e in self.driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed)
        ]


@pytest.fixture()
def page(browser: WebDriver, server: Gunicorn) -> Page:
    return Page(browser, server)


def assert_session_holds_shown_text(page: Page, session_id: str) -> None:
    """The session's state is the state of the text the page shows (same next-token distribution)."""
    shown = page.text("output")
    in_session = page.api("POST", "/next", {"session_id": session_id, "commit": False, "top_n": 5}).json()["next"]
    from_text = page.api("POST", "/next", {"text": shown, "top_n": 5}).json()["next"]
    assert [t["id"] for t in in_session] == [t["id"] for t in from_text]
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(in_session, from_text)) <= 1e-4


def test_generate_streams_text_into_output(page: Page) -> None:
    page.open()
    page.wait(lambda: page.driver.find_elements(By.CSS_SELECTOR, "#distribution li"), what="the first distribution")
    # record #output's length at every DOM change: streamed text arrives in many steps
    page.js(
        "const out = document.getElementById('output'); window.lengths = [];"
        "new MutationObserver(() => window.lengths.push(out.textContent.length))"
        ".observe(out, {childList: true, subtree: true, characterData: true});"
    )
    page.set_value("max-tokens", "1500")
    page.by_id("prompt").send_keys("ROMEO:")
    page.by_id("generate").click()
    status = page.wait_finished()
    assert "finished (length): 1500 tokens" in status

    lengths = page.js("return window.lengths")
    shown = page.text("output")
    assert shown.startswith("ROMEO:") and len(shown) == len("ROMEO:") + 1500  # one character per token
    assert lengths == sorted(lengths) and lengths[-1] == len(shown)
    assert len(set(lengths)) >= 3, f"the text did not stream in: {lengths}"
    # every generated character is shaded by its probability, which the stream reported
    probs = page.js("return [...document.querySelectorAll('#output .gen')].map(s => Number(s.dataset.p))")
    assert len(probs) == 1500 and all(0 < p <= 1 for p in probs) and len(set(probs)) > 10
    assert page.by_id("prompt").get_attribute("value") == ""  # it went into the session
    sid = page.session_id()
    assert page.session_tokens(sid) == len("ROMEO:") + 1500
    assert_session_holds_shown_text(page, sid)
    # the seed shown (63 bits: more than a JS number holds exactly) reproduces the text
    seed = re.search(r"seed (\d+)", status)
    assert seed, status
    knobs = {k: float(page.by_id(k).get_attribute("value") or "") for k in ("temperature", "top-p")}
    again = {"prompt": "ROMEO:", "max_tokens": 1500, "seed": int(seed[1])}
    again |= {"temperature": knobs["temperature"], "top_p": knobs["top-p"]}
    assert page.api("POST", "/generate", again).json()["text"] == shown[len("ROMEO:") :]
    assert page.console_errors() == []


def test_stop_abandons_a_long_generation(page: Page) -> None:
    page.open()
    page.set_value("max-tokens", "100000")
    page.by_id("prompt").send_keys("KING:")
    page.by_id("generate").click()
    page.wait(lambda: len(page.text("output")) > 300, what="some streamed text")
    page.by_id("stop").click()
    page.wait(lambda: page.text("status").startswith("stopped"), what="the stop")
    stopped_at = len(page.text("output"))
    time.sleep(0.5)
    assert len(page.text("output")) == stopped_at < 100_000, "the text kept coming after the stop"
    assert page.driver.find_elements(By.CSS_SELECTOR, "#output .discarded")  # shown as not saved
    assert page.by_id("prompt").get_attribute("value") == "KING:"  # back in the box: it was not saved
    assert page.by_id("generate").is_enabled() and not page.by_id("stop").is_enabled()
    assert page.session_tokens(page.session_id()) == 0  # the server kept nothing of the abandoned stream
    assert page.console_errors() == []


# Records, in the page, how late input events are handled (the main thread's lag), when the status
# line changes, and the animation frames drawn.
RESPONSIVENESS_PROBE = """
const probe = (window.probe = {inputDelays: [], stopPressed: null, stoppedAt: null, frames: 0});
for (const type of ['keydown', 'mousedown']) {
  document.addEventListener(type, (e) => {
    probe.inputDelays.push(performance.now() - e.timeStamp);
    if (type === 'mousedown' && e.target.id === 'stop') probe.stopPressed = e.timeStamp;
  }, true);
}
const status = document.getElementById('status');
new MutationObserver(() => {
  if (probe.stoppedAt === null && status.textContent.startsWith('stopped')) probe.stoppedAt = performance.now();
}).observe(status, {childList: true, subtree: true, characterData: true});
const frame = () => { probe.frames += 1; requestAnimationFrame(frame); };
requestAnimationFrame(frame);
"""


def test_long_stream_stays_responsive(page: Page) -> None:
    """Deep into a 100,000-token stream the page still draws, types and stops at once: the cost of
    drawing may not grow with the text, nor a backlog delay the stop."""
    page.open()
    page.set_value("max-tokens", "100000")
    page.by_id("prompt").send_keys("KING:")
    page.by_id("generate").click()
    page.wait(lambda: len(page.text("output")) > 40_000, timeout=60, what="40,000 streamed characters")
    page.js(RESPONSIVENESS_PROBE)
    time.sleep(1)
    frames, shown = page.js("return [window.probe.frames, document.getElementById('output').textContent.length]")
    assert frames >= 10, f"{frames} frames drawn in a second of streaming"
    assert page.text("status").startswith("generating"), "the generation ended before the test could stop it"

    typed = "Who goes there?"
    started = time.monotonic()
    page.by_id("prompt").send_keys(typed)  # each key waits until the page has handled it
    typing = time.monotonic() - started
    assert page.by_id("prompt").get_attribute("value") == typed
    assert typing < 2.0, f"typing {len(typed)} keys took {typing:.2f} s"

    started = time.monotonic()
    page.by_id("stop").click()
    page.wait(lambda: page.text("status").startswith("stopped"), timeout=10, what="the stop")
    stopping = time.monotonic() - started
    probe = page.js("return window.probe")
    stopped_at = len(page.text("output"))
    time.sleep(0.5)
    assert len(page.text("output")) == stopped_at, "the text kept coming after the stop"
    assert shown < stopped_at < len("KING:") + 100_000
    assert stopping < 1.0, f"the stop took {stopping:.2f} s"
    assert probe["stoppedAt"] - probe["stopPressed"] < 1000, probe
    assert max(probe["inputDelays"]) < 500, f"input handled up to {max(probe['inputDelays']):.0f} ms late"
    assert page.driver.find_elements(By.CSS_SELECTOR, "#output .discarded")
    assert page.by_id("prompt").get_attribute("value") == typed  # what was typed meanwhile is kept
    assert page.session_tokens(page.session_id()) == 0
    assert page.console_errors() == []


def test_distribution_follows_typing(page: Page) -> None:
    page.open()

    def shown() -> list[tuple[int, float]]:  # read in one script: the list is redrawn as we type
        items = page.js("return [...document.querySelectorAll('#distribution li')].map(li => li.dataset)")
        return [(int(i["id"]), float(i["prob"])) for i in items]

    def expected(text: str) -> list[tuple[int, float]]:
        answer = page.api("POST", "/next", {"text": text, "top_n": 10, "commit": False}).json()
        return [(t["id"], t["prob"]) for t in answer["next"]]

    prompt = page.by_id("prompt")
    for typed in ("ROMEO", ":\n", "Wh"):
        prompt.send_keys(typed)
        want = expected(prompt.get_attribute("value") or "")

        def showing(want: list[tuple[int, float]] = want) -> bool:
            return shown() == want

        page.wait(showing, what=f"the distribution after {typed!r}")
    assert len(shown()) == 10 and sum(p for _, p in shown()) <= 1 + 1e-6
    assert "%" in page.text("distribution") and "nats" in page.text("entropy")
    # clicking a token types it
    first = page.driver.find_element(By.CSS_SELECTOR, "#distribution li")
    token = first.get_attribute("data-token")
    first.click()
    assert prompt.get_attribute("value") == f"ROMEO:\nWh{token}"
    page.wait(lambda: shown() == expected(f"ROMEO:\nWh{token}"), what="the distribution after the click")
    assert page.console_errors() == []


def test_continue_fork_reset(page: Page) -> None:
    page.open()
    page.set_value("max-tokens", "20")
    page.by_id("prompt").send_keys("KING:")
    page.by_id("generate").click()
    status = page.wait_finished()
    first = page.session_id()
    assert page.session_tokens(first) == 5 + 20

    # continue: only the new text is sent, the session grows by it and by the new tokens
    page.by_id("prompt").send_keys("\n\nQUEEN:")
    page.by_id("continue").click()
    status = page.wait_finished(status)
    assert page.session_id() == first and page.session_tokens(first) == 25 + 8 + 20
    assert page.text("output").startswith("KING:") and "\n\nQUEEN:" in page.text("output")
    assert_session_holds_shown_text(page, first)
    first_text = page.text("output")

    # fork: an independent copy; continuing it leaves the original alone
    page.by_id("fork").click()
    page.wait(lambda: page.session_id() not in ("", first), what="the fork")
    fork = page.session_id()
    assert page.session_tokens(fork) == 53 and page.text("output") == first_text
    page.set_value("max-tokens", "10")
    page.by_id("prompt").send_keys("x")
    before = page.text("status")
    page.by_id("continue").click()
    page.wait_finished(before)
    assert page.session_tokens(fork) == 53 + 1 + 10 and page.session_tokens(first) == 53
    assert_session_holds_shown_text(page, fork)

    # switch back to the first session: its own text
    sessions = Select(page.by_id("sessions"))
    assert len(sessions.options) == 2
    sessions.select_by_value(first)
    page.wait(lambda: page.session_id() == first, what="the switch")
    assert page.text("output") == first_text

    # reset: the session is deleted on the server and gone from the page
    page.by_id("reset").click()
    page.wait(lambda: page.session_id() == "", what="the reset")
    assert page.api("GET", f"/sessions/{first}").status_code == 404
    assert page.text("output") == "" and len(sessions.options) == 1
    assert page.session_tokens(fork) == 64  # the fork lives on
    assert page.console_errors() == []


def test_api_key_field(page: Page) -> None:
    page.open(key=None)  # keys are on, and the page has none yet
    page.wait(lambda: page.by_id("error").is_displayed(), what="the error")
    refused = requests.get(f"{page.server.base}/info", timeout=10).json()["error"]
    assert refused["code"] in page.text("error") and refused["message"] in page.text("error")

    page.by_id("api-key").send_keys(KEY)
    page.by_id("prompt").send_keys("A")  # leaving the key field applies it
    page.wait(lambda: not page.by_id("error").is_displayed(), what="the error to clear")
    page.set_value("max-tokens", "5")
    page.by_id("generate").click()
    page.wait_finished()
    page.driver.refresh()
    assert page.by_id("api-key").get_attribute("value") == KEY  # remembered (localStorage)
    assert page.console_errors(allowed=("401 (UNAUTHORIZED)",)) == []


def test_api_errors_are_shown(page: Page) -> None:
    page.open()
    page.set_value("max-tokens", "300000")  # over this server's MAX_TOKENS_LIMIT
    page.by_id("generate").click()
    page.wait(lambda: page.by_id("error").is_displayed(), what="the error")
    error = page.text("error")
    assert "invalid_request (HTTP 422)" in error and "max_tokens" in error and "200000" in error
    assert page.text("status").startswith("failed")
    assert page.by_id("generate").is_enabled()
    refused = "/generate - Failed to load resource: the server responded with a status of 422"
    assert page.console_errors(allowed=(refused,)) == []


def test_docs_render_every_operation(page: Page) -> None:
    document = requests.get(f"{page.server.base}/openapi.json", timeout=10).json()  # public, like the page
    operations = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    page.open("/docs", key=None)  # the docs need no key to render
    page.wait(
        lambda: len(page.driver.find_elements(By.CSS_SELECTOR, ".opblock")) >= len(operations),
        what="Swagger UI to render the operations",
    )
    rendered = {
        (
            block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
            block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"),
        )
        for block in page.driver.find_elements(By.CSS_SELECTOR, ".opblock")
    }
    assert rendered == operations
    assert len(page.driver.find_elements(By.CSS_SELECTOR, ".opblock")) == len(operations)
    body = page.text("docs")
    assert "Unable to render" not in body and not page.driver.find_elements(By.CSS_SELECTOR, ".errors-wrapper")
    assert "OAS 3.1" in body
    # the streamed answer of /generate is documented as text/event-stream
    generate = page.driver.find_element(By.ID, "operations-model-generate")
    generate.find_element(By.CSS_SELECTOR, ".opblock-summary-control").click()
    page.wait(lambda: "text/event-stream" in generate.text, what="the /generate details")
    assert page.console_errors() == []
