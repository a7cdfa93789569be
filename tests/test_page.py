"""The browser page `streamer serve` answers at / (streamer/assets/page), in headless Chromium.

Chromium's fake camera plays a .y4m written from a built-in procedural video; the page samples it, sends JPEG
frames to a session on the built-in model, asks the video's own questions and renders the memory. The frames the
page samples depend on timing, so what the answers must be is computed afterwards from the exact JPEG bytes the
server received, as the session ingests them."""

import json
import re
import shutil
import threading
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from test_server import running_server

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # the plain HTTP tests below still run
    webdriver = None

import streamer.service.executor as executor_module
import streamer.service.service as service_module
from streamer.builtin.videos import make_video
from streamer.config import load_config, override
from streamer.engine.models import load_model
from streamer.engine.runner import Runner
from streamer.service.page import PAGE
from streamer.service.protocol import ServerLimits
from video_io.images import decode_image
from video_io.preprocess import resize_frames
from video_io.synthetic import write_y4m

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None or webdriver is None,
                                    reason="needs Chromium, chromedriver (apt install chromium chromium-driver) "
                                           "and selenium (pip install selenium)")

SEED, VIDEO_FRAMES, FPS = 5, 32, 8  # the camera loops a 4 s video; the page samples it at 8 fps
CHUNK_FRAMES = 8
SEND_FRAMES = 32  # the page is stopped once it has sent at least this many
# the stream's session: pyramid keeps as many tokens of every chunk (emloc's choices vary with the frames), 29
# per layer after four chunks (15 of them the prompt), so a budget of 28 evicts the oldest ones
POLICY, BUDGET = "pyramid", 28
TOKEN = "s3cret-Token_1.~"
WAIT_S = 90  # generous: a test that fails once under load is a bug


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The built-in model's matrices are tiny: more threads only wait on each other, and Chromium needs the
    CPUs too (two threads made a chunk 50 times slower beside a busy process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def builtin_runner() -> Runner:
    loaded = load_model("builtin", device="cpu", dtype="float32")
    return Runner(loaded, preset=loaded.preset)


def builtin_config():
    """streamer demo's server config (stream_default on the built-in model), in short chunks at 8 fps."""
    config = load_config("stream_default")
    override(config, "video", fps=float(FPS))
    override(config, "memory", chunk_frames=CHUNK_FRAMES)
    override(config, "generation", max_new_tokens=16)
    return config.validate()


def write_webm(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """A VP8 WebM, which every Chromium build plays (H.264 needs a build with proprietary codecs)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def video():
    return make_video(SEED, VIDEO_FRAMES)


@pytest.fixture(scope="module")
def browser(video, tmp_path_factory):
    camera = tmp_path_factory.mktemp("camera") / "camera.y4m"
    write_y4m(camera, video.frames(), FPS)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                     f"--use-file-for-fake-video-capture={camera}", "--autoplay-policy=no-user-gesture-required",
                     "--window-size=1000,800"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_window_size(1000, 800)
    yield driver
    driver.quit()


# --- reading and driving the page ---------------------------------------------------------------------

def http_url(url: str) -> str:
    return url.replace("ws://", "http://") + "/"


def wait_for(driver, condition, what: str, timeout: float = WAIT_S, errors: bool = False):
    """Wait until condition() is true; an error the page shows ends the wait at once unless `errors`."""
    def check(_):
        if not errors:
            code, message = status(driver)
            assert not code, f"waiting for: {what}, the page shows {message!r}"
        return condition()

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(check, message=what)


def text(driver, element_id: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def status(driver) -> tuple[str, str]:
    return driver.execute_script("const s = document.getElementById('status'); return [s.dataset.code, s.textContent]")


def card(driver, question_id: str) -> dict | None:
    return driver.execute_script("""
        const card = document.querySelector(`.answer[data-id="${arguments[0]}"]`);
        return card && {state: card.dataset.state, question: card.querySelector('.question').textContent,
                        text: card.querySelector('.text').textContent, meta: card.querySelector('.meta').textContent};
    """, question_id)


def type_into(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def click(driver, element_id: str) -> None:
    driver.find_element(By.ID, element_id).click()


def start_session(driver, service) -> str:
    click(driver, "start")
    wait_for(driver, lambda: text(driver, "session-id"), f"no session started; status {status(driver)}")
    session_id = text(driver, "session-id")
    assert session_id in service.sessions
    return session_id


def stream_camera(driver, frames: int) -> int:
    """Stream the fake camera until the page has sent `frames`, stop it (the page flushes), wait until the
    memory panel shows every frame sent ingested; returns the frames sent."""
    click(driver, "source-camera")
    wait_for(driver, lambda: int(text(driver, "frames-sent")) >= frames, f"fewer than {frames} frames sent")
    click(driver, "stop")
    sent = int(text(driver, "frames-sent"))
    wait_for(driver, lambda: text(driver, "frames-ingested") == str(sent) and text(driver, "frames-pending") == "0"
             and text(driver, "chunks-queued") == "0", f"the memory panel never showed {sent} frames ingested")
    return sent


def ask(driver, question_id: str, question: str, state: str = "done") -> dict:
    type_into(driver, "question", question)
    click(driver, "ask")
    wait_for(driver, lambda: (card(driver, question_id) or {}).get("state") == state,
             f"answer {question_id} never reached {state}: {card(driver, question_id)}, status {status(driver)}")
    return card(driver, question_id)


# --- one stream on the built-in model, read by the tests below -----------------------------------------

MEMORY_NUMBERS = {"memory-tokens": "memory_tokens", "full-tokens": "full_tokens", "budget": "budget",
                  "frames-ingested": "frames_ingested", "frames-received": "frames_received", "chunks": "chunks",
                  "evicted-tokens": "evicted_tokens", "frames-dropped": "frames_dropped",
                  "frames-pending": "frames_pending", "chunks-queued": "chunks_queued"}


@pytest.fixture(scope="module")
def streamed(builtin_runner, browser, video):
    """The page streams the fake camera into a session, the memory panel is read once every frame is
    ingested, then the video's own questions are asked one by one."""
    received: list[bytes] = []
    decode = service_module.decode_frame

    def recording(data, session, max_pixels):
        received.append(bytes(data))
        return decode(data, session, max_pixels)

    patch = pytest.MonkeyPatch()
    patch.setattr(service_module, "decode_frame", recording)
    # no frame may be dropped: the expected answers ingest every frame received
    limits = ServerLimits(max_pending_frames=10_000)
    try:
        with running_server(builtin_runner, limits, builtin_config()) as (service, url):
            browser.get(http_url(url))
            policies = browser.execute_script(
                "return [...document.getElementById('opt-policy').options].map(o => [o.value, o.selected])")
            Select(browser.find_element(By.ID, "opt-policy")).select_by_value(POLICY)
            type_into(browser, "opt-budget", str(BUDGET))
            session_id = start_session(browser, service)
            session = service.sessions[session_id]
            ready = [text(browser, "session-policy"), text(browser, "session-budget")]
            sent = stream_camera(browser, SEND_FRAMES)
            panel = {name: browser.execute_script("return document.getElementById(arguments[0]).dataset.value", name)
                     for name in MEMORY_NUMBERS}  # exact; the text shows memory tokens to one decimal
            charts = browser.execute_script("""
                const bars = (id) => [...document.querySelectorAll(`#${id} .bar`)];
                return {layers: bars('layers').map(b => b.title), timeline: bars('timeline').map(b => b.title),
                        heights: bars('timeline').map(b => b.style.height),
                        ratios: document.getElementById('last-ratios').textContent};""")
            stats = session.stats()
            answers = [ask(browser, f"q{i + 1}", qa.question) for i, qa in enumerate(video.questions())]
            resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
            final_status = status(browser)
            config, fps = session.config, session.fps
    finally:
        patch.undo()
    return dict(service_info=service.page_info(), policies=policies, session_id=session_id, ready=ready, sent=sent,
                panel=panel, charts=charts, stats=stats, answers=answers, received=received, config=config, fps=fps,
                resources=resources, url=http_url(url), status=final_status, max_frame_pixels=limits.max_frame_pixels)


def expected_answers(runner: Runner, streamed: dict, questions: list[str]) -> tuple[list[str], list[np.ndarray]]:
    """What the session answers on the JPEGs it received: decoded as it decodes them, ingested in its chunks with
    its policy, preset and rate, then answered as `streamer ask` answers."""
    config = streamed["config"]
    preset = config.vision_preset(runner.preset)
    images = [resize_frames([decode_image(data, streamed["max_frame_pixels"])], preset)[0]
              for data in streamed["received"]]
    policy = config.make_policy()
    memory = runner.new_memory(**config.memory.limits())
    chunk = config.memory.chunk_frames
    for start in range(0, len(images), chunk):
        runner.ingest(memory, images[start:start + chunk], policy, preset, streamed["fps"])
    return [runner.answer(memory, q, config.generation.max_new_tokens).text for q in questions], images


@needs_chromium
def test_the_page_answers_as_the_model_does_on_the_frames_it_sent(streamed, builtin_runner, video):
    assert streamed["policies"] == [[name, name == streamed["service_info"]["policy"]]
                                    for name in streamed["service_info"]["policies"]]
    assert len(streamed["received"]) == streamed["sent"] >= SEND_FRAMES
    questions = [qa.question for qa in video.questions()]
    expected, images = expected_answers(builtin_runner, streamed, questions)
    # the frames are the camera file's (not Chromium's own test pattern): each is near one of the video's frames
    originals = np.stack(video.frames()).astype(np.float32)
    for image in images:
        assert image.shape == originals.shape[1:]
        assert np.abs(originals - image).mean(axis=(1, 2, 3)).min() < 12
    shown = streamed["answers"]
    assert [a["question"] for a in shown] == questions
    assert [a["text"] for a in shown] == expected
    assert any(a["text"].strip() for a in shown)
    for answer in shown:  # the client's TTFT (none for an empty answer), the server's, the decoding rate
        client = r"\d+\.\d{3} s" if answer["text"] else r"(\d+\.\d{3} s|–)"
        assert re.match(rf"TTFT {client} here, \d+\.\d{{3}} s on the server · \d+\.\d tokens/s · ",
                        answer["meta"]), answer["meta"]
    assert streamed["status"][0] == "", streamed["status"]  # no error on the way
    # offline: everything the page loaded came from its own server
    assert streamed["resources"] and all(name.startswith(streamed["url"]) for name in streamed["resources"])


@needs_chromium
def test_the_memory_panel_shows_the_sessions_stats(streamed):
    stats, panel = streamed["stats"], streamed["panel"]
    assert streamed["ready"] == [POLICY, str(BUDGET)]  # the options changed on the page reached the session
    for element_id, key in MEMORY_NUMBERS.items():
        assert float(panel[element_id]) == stats[key], (element_id, panel[element_id], stats[key])
    assert stats["policy"] == POLICY and stats["budget"] == BUDGET and stats["frames_dropped"] == 0
    assert stats["evicted_tokens"] > 0  # the budget bites: the timeline shows the past thinning
    assert stats["chunks"] == -(-streamed["sent"] // CHUNK_FRAMES)
    charts = streamed["charts"]
    per_layer = stats["memory_tokens_per_layer"]
    assert charts["layers"] == [f"layer {i}: {tokens} tokens" for i, tokens in enumerate(per_layer)]
    timeline = stats["timeline"]
    assert len(charts["timeline"]) == len(timeline) == stats["chunks"]
    for title, height, stretch in zip(charts["timeline"], charts["heights"], timeline):
        shown = re.match(r"(\d+\.\d)–(\d+\.\d) s: ", title)  # JS rounds halves up, Python to even
        assert shown and [float(t) for t in shown.groups()] == pytest.approx([stretch["start_s"], stretch["end_s"]],
                                                                             abs=0.051), title
        if stretch["held"] is None:  # no chunk's middle in it (a short last chunk makes the stretches uneven)
            assert height == "" and "no chunk" in title
        else:
            assert float(height.removesuffix("%")) == pytest.approx(100 * stretch["held"], rel=1e-4)
    assert min(s["of_kept"] for s in timeline if s["of_kept"] is not None) < 1  # evictions show
    assert [float(r) for r in charts["ratios"].split()] == pytest.approx(stats["last_ratios"], abs=5e-4)


# --- the token, a cancelled answer, a phone's screen --------------------------------------------------------

@needs_chromium
def test_a_wrong_token_is_shown_as_refused_and_the_right_one_starts(builtin_runner, browser):
    with running_server(builtin_runner, ServerLimits(token=TOKEN), builtin_config()) as (service, url):
        browser.get(http_url(url))
        assert browser.execute_script("return !document.getElementById('token-row').hidden")
        type_into(browser, "token", "not a token!")  # a space and "!" cannot travel in a subprotocol
        assert browser.execute_script("return !document.getElementById('token-hint').hidden")
        click(browser, "start")
        wait_for(browser, lambda: status(browser)[0] == "bad_token", f"no bad_token shown: {status(browser)}",
                 errors=True)
        type_into(browser, "token", "wrong-token")
        click(browser, "start")
        wait_for(browser, lambda: status(browser)[0] == "unauthorized", f"no refusal shown: {status(browser)}",
                 errors=True)
        assert status(browser)[1].startswith("unauthorized: a valid bearer token is required")
        assert "check the token" in text(browser, "status-hint").lower()
        wait_for(browser, lambda: text(browser, "connection") == "not connected", "the refused socket stays open",
                 errors=True)
        assert status(browser)[0] == "unauthorized"  # the close that follows does not hide the refusal
        assert not service.sessions and text(browser, "session-id") == ""
        type_into(browser, "token", TOKEN)
        start_session(browser, service)
        assert status(browser)[0] == ""


@needs_chromium
def test_a_stopped_answer_is_marked_cancelled_and_the_session_goes_on(builtin_runner, browser, monkeypatch):
    """The model thread is held after an answer's first step until the page's Stop-answer has been handled, so
    the answer cannot finish first."""
    release = threading.Event()
    advance = executor_module.advance

    def held(runner, generations):
        advance(runner, generations)
        release.wait(timeout=WAIT_S)

    monkeypatch.setattr(executor_module, "advance", held)
    try:
        with running_server(builtin_runner, None, builtin_config()) as (service, url):
            browser.get(http_url(url))
            start_session(browser, service)
            stream_camera(browser, CHUNK_FRAMES)  # no answer yet: nothing is held
            type_into(browser, "question", "What colour appeared first?")
            click(browser, "ask")
            wait_for(browser, lambda: (card(browser, "q1") or {}).get("state") == "streaming", "no answer card")
            browser.execute_script("document.querySelector('.answer[data-id=\"q1\"] .cancel').click()")
            wait_for(browser, lambda: card(browser, "q1")["state"] == "cancelled",
                     f"not cancelled: {card(browser, 'q1')}")
            assert "stopped" in card(browser, "q1")["meta"]
            release.set()
            assert "on the server" in ask(browser, "q2", "What colour appeared first?")["meta"]  # answered in full
            assert status(browser)[0] == ""
    finally:
        release.set()


@needs_chromium
def test_a_video_file_streams_to_its_end_and_the_memory_saves_and_loads(builtin_runner, browser, video, tmp_path):
    clip, root = tmp_path / "clip.webm", tmp_path / "root"
    write_webm(clip, video.frames(), FPS)
    root.mkdir()
    limits = ServerLimits(allowed_roots=[root], max_pending_frames=10_000)
    with running_server(builtin_runner, limits, builtin_config()) as (service, url):
        browser.get(http_url(url))
        session = service.sessions[start_session(browser, service)]
        browser.find_element(By.ID, "source-file").send_keys(str(clip))
        wait_for(browser, lambda: int(text(browser, "frames-sent")) > 0, "the file sent no frame")
        # at its end the page stops by itself and flushes
        wait_for(browser, lambda: text(browser, "source-name") == "none"
                 and text(browser, "frames-ingested") == text(browser, "frames-sent"), "the file was not ingested")
        sent = int(text(browser, "frames-sent"))
        assert session.received == sent >= VIDEO_FRAMES // 2
        assert VIDEO_FRAMES / FPS - 1 < session.last_ts <= VIDEO_FRAMES / FPS  # the stream time is the file's
        assert browser.execute_script("return !document.getElementById('files').hidden")
        type_into(browser, "snapshot-path", "memory.safetensors")
        click(browser, "save")
        wait_for(browser, lambda: text(browser, "files-result").startswith("saved the memory"), "not saved")
        assert (root / "memory.safetensors").is_file()
        refreshed = int(browser.execute_script("return document.getElementById('memory').dataset.stats"))
        click(browser, "load")
        wait_for(browser, lambda: text(browser, "files-result").startswith("loaded the memory")
                 and int(browser.execute_script("return document.getElementById('memory').dataset.stats")) > refreshed,
                 "not loaded")
        assert text(browser, "frames-ingested") == str(session.memory.frames) == str(sent)


@needs_chromium
def test_a_phone_sized_window_gets_one_column(builtin_runner, browser):
    with running_server(builtin_runner, None, builtin_config()) as (_, url):
        browser.set_window_size(390, 844)
        try:
            browser.get(http_url(url))
            layout = browser.execute_script("""
                const columns = [...document.querySelectorAll('main > .column')];
                const [left, right] = columns.map(c => c.getBoundingClientRect());
                return {stacked: right.top >= left.bottom && Math.abs(right.left - left.left) < 1,
                        overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth};""")
        finally:
            browser.set_window_size(1000, 800)
    assert layout == {"stacked": True, "overflow": 0}


# --- served with the server's facts, offline -------------------------------------------------------------

def get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return response.headers["Content-Type"], response.read()


def test_the_page_is_served_with_the_server_info(tiny_runner, tmp_path):
    """streamer serve's app (the one Ray Serve's replicas run too) answers /, /page.js and /page.css."""
    limits = ServerLimits(token=TOKEN, allowed_roots=[tmp_path])
    with running_server(tiny_runner, limits) as (service, url):
        base = http_url(url)
        content_type, html = get(base)  # the page itself needs no token: its websocket does
        scripts = {path: get(base + path) for path in ("page.js", "page.css")}
        info = service.page_info()
    assert content_type == "text/html; charset=utf-8"
    found = re.search(rb'<script id="server-info" type="application/json">(.*?)</script>', html, re.S)
    assert found and json.loads(found.group(1)) == info
    assert info["token"] is True and info["files"] is True and info["policy"] in info["policies"]
    assert b"{{SERVER_INFO}}" not in html
    assert scripts == {"page.js": ("text/javascript; charset=utf-8", (PAGE / "page.js").read_bytes()),
                       "page.css": ("text/css; charset=utf-8", (PAGE / "page.css").read_bytes())}


def test_the_page_needs_nothing_from_another_host():
    files = {name: (PAGE / name).read_text(encoding="utf-8") for name in ("index.html", "page.js", "page.css")}
    assert '<script id="server-info" type="application/json">{{SERVER_INFO}}</script>' in files["index.html"]
    for name, source in files.items():
        assert not re.findall(r"(?:https?|wss?|ftp)://", source, re.I), name  # no URL to another host
        # nor one without a scheme, in an attribute, a CSS url() or an @import
        assert not re.findall(r"""(?:src|href)\s*=\s*["']?//|url\(\s*["']?//|@import""", source, re.I), name
