"""Regenerate docs/page.png, the README's picture of the browser page `streamer serve` answers at /.

    python tools/page_screenshot.py [docs/page.png]

Starts a server on the built-in model in this process, opens the page in headless Chromium (/usr/bin/chromium and
chromedriver, as tests/test_page.py) whose fake camera plays a built-in procedural video, streams it into a session
with a small memory budget, asks two of the video's own questions while it streams, waits for the answers and the
next refresh of the memory panel, and saves a 1000 x 800 screenshot (as a palette PNG: it stays small in the
repository).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from streamer.builtin.videos import make_video
from streamer.config import load_config, override
from streamer.engine.models import load_model
from streamer.engine.runner import Runner
from streamer.service.protocol import ServerLimits
from streamer.service.server import serving
from streamer.service.service import StreamService
from video_io.synthetic import write_y4m

SEED, FRAMES, FPS = 7, 96, 8
CHUNK_FRAMES, BUDGET = 8, 56  # small enough that the timeline shows the oldest stretches thinning
SIZE = (1000, 800)
ROOT = Path(__file__).resolve().parents[1]


def browser(camera: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                     f"--use-file-for-fake-video-capture={camera}", "--hide-scrollbars",
                     f"--window-size={SIZE[0]},{SIZE[1]}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
    driver.set_window_size(*SIZE)
    return driver


def fit_viewport(driver: webdriver.Chrome) -> None:
    """Make the page's viewport (not the window around it) SIZE."""
    width, height = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(2 * SIZE[0] - width, 2 * SIZE[1] - height)


def drive(driver: webdriver.Chrome, url: str, questions: list[str], out: Path) -> None:
    text = lambda element_id: driver.execute_script(  # noqa: E731
        "return document.getElementById(arguments[0]).textContent", element_id)
    wait = WebDriverWait(driver, 300, poll_frequency=0.1)

    def fill(element_id: str, value: str) -> None:
        field = driver.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(value)

    driver.get(url)
    fit_viewport(driver)
    fill("opt-budget", str(BUDGET))
    fill("opt-chunk-frames", str(CHUNK_FRAMES))
    driver.find_element(By.ID, "start").click()
    wait.until(lambda _: text("session-id"), "no session")
    driver.find_element(By.ID, "source-camera").click()
    wait.until(lambda _: int(text("frames-sent")) >= FRAMES, "the camera sent too few frames")
    for number, question in enumerate(questions, 1):  # while the camera streams on
        fill("question", question)
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda _: driver.execute_script(
            "const c = document.querySelector(`.answer[data-id='q${arguments[0]}']`); return c && c.dataset.state",
            number) == "done", f"question {number} was not answered")
    chunks = int(text("chunks"))
    wait.until(lambda _: int(text("chunks")) > chunks, "the memory panel was not refreshed")
    driver.execute_script("window.scrollTo(0, 0)")
    png = out.with_suffix(".full.png")
    driver.save_screenshot(str(png))
    Image.open(png).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    png.unlink()


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "page.png"
    torch.set_num_threads(1)  # the built-in model's matrices are tiny; Chromium needs a CPU too
    loaded = load_model("builtin", device="cpu", dtype="float32")
    runner = Runner(loaded, preset=loaded.preset)
    config = load_config("stream_default")
    override(config, "video", fps=float(FPS))
    service = StreamService(runner, config.validate(), ServerLimits(max_pending_frames=10_000))
    video = make_video(SEED, FRAMES)
    with serving(service) as port, tempfile.TemporaryDirectory() as tmp:
        camera = Path(tmp) / "camera.y4m"
        write_y4m(camera, video.frames(), FPS)
        driver = browser(camera)
        try:
            drive(driver, f"http://127.0.0.1:{port}/", [qa.question for qa in video.questions()[:2]], out)
        finally:
            driver.quit()
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
