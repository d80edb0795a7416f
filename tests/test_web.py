"""
The web page of `flashsloth serve` in a real headless browser: Debian's Chromium, driven by selenium through Debian's
chromedriver. An image is chosen with the file input, another one dropped on the page; each question's streamed
answer must equal the in-process answer of the same image and question. A broken image shows the server's error.

Set FLASHSLOTH_WEB_SCREENSHOT=docs/serving_web.png to also save the screenshot that docs/serving.md shows.
"""

import base64
import os
import random
import shutil

import pytest
import torch

from flashsloth.demo import DEMO_MODEL_DIR
from flashsloth.training import synthetic


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(
        f"the browser test needs Debian's Chromium ({CHROMIUM}) and its driver ({CHROMEDRIVER}): "
        "apt-get install -y chromium chromium-driver (.ci/run installs them)",
        allow_module_level=True,
    )
pytest.importorskip(
    "selenium", reason="the browser test drives Chromium with selenium: pip install 'flashsloth[test]'"
)
pytest.importorskip("fastapi", reason="flashsloth serve needs FastAPI: pip install 'flashsloth[serve]'")
pytest.importorskip("uvicorn", reason="flashsloth serve needs uvicorn: pip install 'flashsloth[serve]'")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from flashsloth.serve.load_test import start_server, stop_server  # noqa: E402


@pytest.fixture(scope="module")
def server():
    process, url = start_server(str(DEMO_MODEL_DIR))
    yield url
    stop_server(process)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=900,720",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def in_process_answer(image, question: str) -> str:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(DEMO_MODEL_DIR, trust_remote_code=True).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor(images=[image], text=processor.apply_chat_template(messages, add_generation_prompt=True))
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def draw(seed: int, path):
    rng = random.Random(seed)
    scene, record = synthetic.make_sample(seed, 2, rng)
    image = synthetic.render_scene(scene, 288, rng)
    image.save(path)
    return image, record["conversations"][0]["value"].replace("<image>", "").strip()


def ask(driver, question: str) -> str:
    field = driver.find_element(By.ID, "question")
    field.clear()
    field.send_keys(question)
    driver.find_element(By.ID, "send").click()
    answer = driver.find_element(By.ID, "answer")
    WebDriverWait(driver, 60).until(lambda _: answer.get_attribute("data-done") == "true")
    return answer.text


DROP_SCRIPT = """
const [name, type, encoded] = arguments;
const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, { type }));
document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
"""


def test_ask_about_an_uploaded_and_a_dropped_image(server, browser, tmp_path):
    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda driver: driver.find_element(By.ID, "model").text == "flashsloth-demo")

    dropped, dropped_question = draw(3, tmp_path / "dropped.png")
    encoded = base64.b64encode((tmp_path / "dropped.png").read_bytes()).decode()
    browser.execute_script(DROP_SCRIPT, "dropped.png", "image/png", encoded)
    WebDriverWait(browser, 10).until(lambda driver: driver.find_element(By.ID, "preview").get_attribute("src"))
    assert ask(browser, dropped_question) == in_process_answer(dropped, dropped_question)
    assert browser.find_element(By.ID, "status").text == "done"

    uploaded, question = draw(5, tmp_path / "scene.png")
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "scene.png"))
    WebDriverWait(browser, 10).until(lambda driver: driver.find_element(By.ID, "drop-hint").text == "scene.png")
    answer = ask(browser, question)
    assert answer == in_process_answer(uploaded, question)
    assert int(browser.find_element(By.ID, "answer").get_attribute("data-chunks")) >= 1
    assert browser.find_element(By.ID, "status").text == "done"
    screenshot = tmp_path / "serving_web.png"
    browser.save_screenshot(str(screenshot))
    if os.environ.get("FLASHSLOTH_WEB_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["FLASHSLOTH_WEB_SCREENSHOT"])


def test_the_page_shows_the_servers_error(server, browser, tmp_path):
    browser.get(server + "/")
    (tmp_path / "broken.png").write_bytes(b"this is not a PNG")
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "broken.png"))
    WebDriverWait(browser, 10).until(lambda driver: driver.find_element(By.ID, "drop-hint").text == "broken.png")
    ask(browser, "What color is the circle?")
    status = browser.find_element(By.ID, "status")
    assert status.get_attribute("class") == "error"
    assert "Cannot decode the image" in status.text
