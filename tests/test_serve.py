"""``semifer serve``: the web app as a real server process, its API, its memory, and the page in headless Chromium.

The server runs as ``python -m semifer.cli serve`` on a tiny model trained here (the
bundled one may not be packed). Its CSVs are compared with ``semifer predict``'s byte for
byte, apart from the ``source`` column (the uploaded file's name instead of a path).
``SEMIFER_SCREENSHOTS=DIR`` makes the browser test save the docs/web.md screenshots there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")
pytest.importorskip("cv2")
pytest.importorskip("skimage")
requests = pytest.importorskip("requests")

import semifer  # noqa: E402
from semifer.cli import main  # noqa: E402
from semifer.labels import ABAW_LABELS  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.media_helpers import face_video  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Path:
    """Two finished tiny runs (dtm, supervised) and "live", a dtm run whose log is cut at half (it grows in a test)."""
    root = tmp_path_factory.mktemp("serve") / "runs"
    semifer.train(tiny_config(tiny_data, root / "dtm", algorithm="dtm", steps=12))
    semifer.train(tiny_config(tiny_data, root / "supervised", algorithm="supervised", steps=9))
    live = root / "live"
    live.mkdir()
    shutil.copy(root / "dtm" / "config.yaml", live / "config.yaml")
    lines = (root / "dtm" / "metrics.jsonl").read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if json.loads(line)["kind"] == "eval") + 1
    (live / "metrics.jsonl").write_text("".join(lines[:cut]))
    (live / "rest.jsonl.txt").write_text("".join(lines[cut:]))
    return root


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    from skimage import data

    d = tmp_path_factory.mktemp("serve_media")
    out = {"astronaut": d / "astronaut.png", "text": d / "notes.txt", "grey": d / "grey.png",
           "clip": face_video(d / "clip.avi", "FF-FFF-FF"), "badvideo": d / "broken.mp4", "big": d / "big.png"}
    Image.fromarray(data.astronaut()).save(out["astronaut"])   # 512 x 512, one face
    out["text"].write_text("this is not a photo\n")
    Image.fromarray(np.full((240, 320, 3), 128, np.uint8)).save(out["grey"])
    out["badvideo"].write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    out["big"].write_bytes(b"\x89PNG" + os.urandom(3 * 2**20))   # over the test server's 2 MB limit
    return out


@pytest.fixture(scope="module")
def reference(runs, media, tmp_path_factory) -> dict[str, str]:
    """``semifer predict``'s CSVs (and ABAW file) for the astronaut and the clip, sources named as the server names them."""
    import torch

    from semifer.engine.threads import choose_threads

    out = tmp_path_factory.mktemp("serve_ref")
    model = str(runs / "dtm")
    # the thread count the server picks (probabilities differ in the last digits between counts)
    before = torch.get_num_threads()
    torch.set_num_threads(choose_threads(0)[0])
    try:
        assert main(["predict", model, str(media["astronaut"]), "--out", str(out / "photo"), "--quiet"]) == 0
        assert main(["predict", model, str(media["clip"]), "--out", str(out / "clip"), "--smooth", "0.5",
                     "--annotate", "--abaw", "txt", "--quiet"]) == 0
    finally:
        torch.set_num_threads(before)
    return {"photo": (out / "photo" / "predictions.csv").read_text().replace(str(media["astronaut"]), "astronaut.png"),
            "clip": (out / "clip" / "predictions.csv").read_text().replace(str(media["clip"]), "clip.avi"),
            "abaw": (out / "clip" / "abaw" / "clip.txt").read_text()}


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def info(self) -> dict:
        return requests.get(self.url + "/api/info", timeout=30).json()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        self.proc.terminate()   # uvicorn shuts down cleanly on SIGTERM (the temp folder is removed)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(model: Path, runs: Path, log: Path, max_upload_mb: float = 2.0) -> Server:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with log.open("w") as out:   # the child keeps its own copy of the file
        proc = subprocess.Popen([sys.executable, "-m", "semifer.cli", "serve", str(model), "--runs", str(runs),
                                 "--port", str(port), "--max-upload-mb", str(max_upload_mb)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"semifer serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(server.url + "/api/info", timeout=2).read()
            return server
        except OSError:
            time.sleep(0.25)
    server.stop()
    pytest.fail(f"semifer serve did not answer within 180 s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    s = start_server(runs / "dtm", runs, tmp_path_factory.mktemp("serve_log") / "serve.log")
    yield s
    s.stop()


def post_photos(server: Server, *paths: Path, live: bool = False) -> requests.Response:
    files = [("files", (p.name, p.read_bytes())) for p in paths]
    return requests.post(server.url + "/api/photos", files=files, data={"live": "1"} if live else {}, timeout=120)


def wait_video(server: Server, job: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = requests.get(f"{server.url}/api/videos/{job}", timeout=30).json()
        if state["status"] in ("done", "error"):
            return state
        time.sleep(0.3)
    raise AssertionError(f"video job {job} still {state['status']} after {timeout} s")


# --------------------------------------------------------------------------- API
def test_photos_give_predicts_csv_and_clear_errors(server, media, reference):
    r = post_photos(server, media["astronaut"], media["text"], media["grey"])
    assert r.status_code == 200, r.text
    body = r.json()
    astro, text, grey = body["results"]
    assert (astro["width"], astro["height"]) == (512, 512) and astro["error"] is None
    assert len(astro["faces"]) == 1
    face = astro["faces"][0]
    x1, y1, x2, y2 = face["box"]
    assert 150 < x1 < x2 < 300 and 30 < y1 < y2 < 200   # her face, upper middle of the photo
    assert len(face["probs"]) == 8 and abs(sum(face["probs"]) - 1) < 1e-4
    assert face["label"] == ABAW_LABELS[int(np.argmax(face["probs"]))]
    assert text["error"] == "notes.txt: not an image (PNG, JPEG, WebP, BMP, GIF or TIFF expected)" and not text["faces"]
    assert grey["error"] == "grey.png: no face found in this photo" and grey["width"] == 320
    csv = requests.get(server.url + body["csv"], timeout=30)
    assert csv.status_code == 200 and "attachment" in csv.headers["content-disposition"]
    # predict's CSV for the same files: the astronaut's rows, then the grey photo's "none" row
    lines = csv.text.splitlines(keepends=True)
    assert lines[:2] == reference["photo"].splitlines(keepends=True)
    assert lines[2].startswith("grey.png,0,0.000,,") and lines[2].endswith(",none\n") and len(lines) == 3

    one = post_photos(server, media["astronaut"]).json()
    assert requests.get(server.url + one["csv"], timeout=30).text == reference["photo"]   # byte for byte


def test_bad_input_gets_a_message_and_the_server_keeps_serving(server, media):
    big = post_photos(server, media["big"])
    assert big.status_code == 413 and "upload too large: the limit is 2 MB" in big.json()["detail"]
    # a body without Content-Length (chunked) is counted as it arrives
    head = b'--zz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    chunks = iter([head] + [b"x" * 2**20] * 3 + [b"\r\n--zz--\r\n"])
    chunked = requests.post(server.url + "/api/photos", data=chunks, timeout=60,
                            headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert chunked.status_code == 413 and "too large" in chunked.json()["detail"]
    not_video = requests.post(server.url + "/api/videos", files={"file": ("notes.txt", b"hello")}, timeout=60)
    assert not_video.status_code == 400 and "notes.txt: not a video file" in not_video.json()["detail"]
    image = requests.post(server.url + "/api/videos", files={"file": ("a.png", media["grey"].read_bytes())}, timeout=60)
    assert image.status_code == 400 and "an image; use the Photos tab" in image.json()["detail"]
    broken = requests.post(server.url + "/api/videos", files={"file": ("broken.mp4", media["badvideo"].read_bytes())},
                           timeout=60)
    assert broken.status_code == 400
    assert broken.json()["detail"] == "broken.mp4: OpenCV cannot read this video (unreadable video)"
    assert requests.get(server.url + "/api/photos/nope/predictions.csv", timeout=30).status_code == 404
    assert requests.get(server.url + "/api/videos/nope/files/../../etc/passwd", timeout=30).status_code == 404
    live = post_photos(server, media["text"], live=True)
    assert live.status_code == 400 and "not an image" in live.json()["detail"]
    ok = post_photos(server, media["astronaut"])   # still serving, and correctly
    assert ok.status_code == 200 and len(ok.json()["results"][0]["faces"]) == 1
    work = Path(server.info()["workdir"])
    assert work.is_dir() and not list(work.rglob("upload/*")) and not list(work.glob("live/*"))   # uploads are not kept once answered
    assert Path(os.path.commonpath([work, Path(_tempdir())])) == Path(_tempdir())


def _tempdir() -> str:
    import tempfile

    return tempfile.gettempdir()


def test_video_job_timeline_csv_and_abaw(server, media, reference):
    with media["clip"].open("rb") as f:
        r = requests.post(server.url + "/api/videos", files={"file": ("clip.avi", f)},
                          data={"smooth": "0.5", "every": "1"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["total"] == 9
    state = wait_video(server, r.json()["id"])
    assert state["status"] == "done", state["error"]
    assert state["done"] == state["total"] == state["frames"] == 9 and state["faces"] == 7
    tl = state["timeline"]
    assert tl["frame"] == list(range(9)) and [p is None for p in tl["probs"]] == [c == "-" for c in "FF-FFF-FF"]
    base = f"{server.url}/api/videos/{state['id']}/files/"
    assert requests.get(base + state["files"]["predictions.csv"], timeout=30).text == reference["clip"]
    assert requests.get(base + state["files"]["abaw"], timeout=30).text == reference["abaw"]
    for key in ("annotated.mp4", "annotated.webm"):
        assert len(requests.get(base + state["files"][key], timeout=30).content) > 1000
    assert len(state["thumbs"]) == 8
    assert requests.get(base + state["thumbs"][0], timeout=30).content[:2] == b"\xff\xd8"   # JPEG


def test_runs_api_lists_runs_and_follows_a_growing_log(server, runs):
    listing = requests.get(server.url + "/api/runs", timeout=30).json()
    by_name = {r["name"]: r for r in listing["runs"]}
    assert sorted(by_name) == ["dtm", "live", "supervised"]
    assert by_name["dtm"]["algorithm"] == "dtm" and by_name["dtm"]["finished"] and by_name["dtm"]["last_step"] == 12
    d = requests.get(server.url + "/api/run", params={"name": "dtm"}, timeout=30).json()
    assert d["eval"]["step"] == [3, 6, 9, 12] and len(d["eval"]["macro_f1"]) == 4
    assert d["best"]["macro_f1"] == max(d["eval"]["macro_f1"])
    assert all(len(row) == 8 for row in d["train"]["thresholds"]["value"])
    assert "mask_rate" in d["train"] and "pseudo_class_mix" in d["train"]
    assert np.asarray(d["confusion"]["matrix"]).shape == (8, 8) and d["confusion"]["step"] == d["best"]["step"]
    assert "algorithm: dtm" in d["config"]
    sup = requests.get(server.url + "/api/run", params={"name": "supervised"}, timeout=30).json()
    assert "thresholds" not in sup["train"] and sup["eval"]["step"] == [3, 6, 9]
    assert requests.get(server.url + "/api/run", params={"name": "../serve_media"}, timeout=30).status_code == 404
    # a training run appends to metrics.jsonl: the next read shows the new records
    tmp = runs / "grow"
    shutil.copytree(runs / "live", tmp)
    before = requests.get(server.url + "/api/run", params={"name": "grow"}, timeout=30).json()
    with (tmp / "metrics.jsonl").open("a") as f:
        f.write((tmp / "rest.jsonl.txt").read_text())
    after = requests.get(server.url + "/api/run", params={"name": "grow"}, timeout=30).json()
    assert before["eval"]["step"] == [3] and after["eval"]["step"] == [3, 6, 9, 12]
    assert before["version"] != after["version"]
    shutil.rmtree(tmp)


def test_serve_with_a_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nothing.pt")]) == 2
    assert "no such run directory, checkpoint or .onnx file" in capsys.readouterr().err


def test_20_concurrent_photos_and_memory_returns_to_idle(runs, media, reference, tmp_path):
    server = start_server(runs / "dtm", runs, tmp_path / "serve.log")
    try:
        time.sleep(1.0)
        idle = server.rss_mb()
        ref = reference["photo"].splitlines()[1].split(",")
        want_probs = [float(v) for v in ref[9:17]]
        want_box = [float(v) for v in ref[4:8]]
        payload = media["astronaut"].read_bytes()

        def one(i: int) -> dict:
            r = requests.post(server.url + "/api/photos", files=[("files", (f"a{i}.png", payload))], timeout=300)
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(one, range(20)))
        for i, a in enumerate(answers):
            (res,) = a["results"]
            assert res["name"] == f"a{i}.png" and len(res["faces"]) == 1
            assert res["faces"][0]["probs"] == want_probs and res["faces"][0]["box"] == want_box
        assert len({a["job"] for a in answers}) == 20
        deadline, rss = time.time() + 20, server.rss_mb()
        while rss > 1.10 * idle and time.time() < deadline:
            time.sleep(0.5)
            rss = server.rss_mb()
        assert rss <= 1.10 * idle, f"RSS {rss:.0f} MB after the burst, idle was {idle:.0f} MB"
        assert requests.get(server.url + "/api/info", timeout=30).status_code == 200
    finally:
        work = server.info()["workdir"]
        server.stop()
    assert not Path(work).exists()   # the temp folder goes with the server


# --------------------------------------------------------------------------- browser
def _chrome(download_dir: Path, camera: Path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no headless Chromium here: `make test` installs Debian's chromium and chromium-driver with "
                    "apt-get where it can (as root with apt); this machine has neither the browser nor a way to get it")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={camera}",
                "--disable-background-networking", "--disable-component-update", "--no-first-run"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                           "download.prompt_for_download": False})
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    drv.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    return drv


def _shot(drv, name: str) -> None:
    """Save a screenshot of the whole page for docs/web.md when SEMIFER_SCREENSHOTS is set."""
    import base64

    folder = os.environ.get("SEMIFER_SCREENSHOTS")
    if not folder:
        return
    time.sleep(0.3)
    size = drv.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 2400), "scale": 1}
    png = drv.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"web_{name}.png").write_bytes(base64.b64decode(png["data"]))


def _y4m(path: Path, frame: np.ndarray, count: int = 10) -> Path:
    """A Y4M clip of one RGB frame: Chromium's fake webcam plays it (--use-file-for-fake-video-capture)."""
    rgb = frame.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    v = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    half = lambda c: c.reshape(c.shape[0] // 2, 2, c.shape[1] // 2, 2).mean((1, 3))  # noqa: E731 - 4:2:0
    planes = b"".join(np.clip(p, 0, 255).round().astype(np.uint8).tobytes() for p in (y, half(u), half(v)))
    h, w = frame.shape[:2]
    path.write_bytes(f"YUV4MPEG2 W{w} H{h} F10:1 Ip A1:1 C420jpeg\n".encode() + b"FRAME\n".join([b""] + [planes] * count))
    return path


def test_page_in_headless_chromium(server, media, reference, runs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    from skimage import data

    webcam = np.full((480, 640, 3), 90, np.uint8)
    webcam[:, 64:576] = np.asarray(Image.fromarray(data.astronaut()).resize((512, 480)))
    drv = _chrome(downloads, _y4m(tmp_path / "webcam.y4m", webcam))
    wait = WebDriverWait(drv, 90)
    css = lambda sel: drv.find_elements(By.CSS_SELECTOR, sel)  # noqa: E731

    def choose(input_id: str, path: Path) -> None:
        field = drv.find_element(By.ID, input_id)
        drv.execute_script("arguments[0].value = ''", field)   # a multiple input would add to what it holds
        field.send_keys(str(path))
    try:
        drv.get(server.url + "/#photos")
        wait.until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
        assert drv.execute_script("return [...document.querySelectorAll('script[src],link[href]')]"
                                  ".every(e => (e.src || e.href).startsWith(location.origin) || e.href === 'data:,')")

        # Photos: one face box, 8 bars, the CSV download equals semifer predict's
        choose("photo-input", media["astronaut"])
        wait.until(lambda d: css(".photo-card"))
        wait.until(lambda d: drv.execute_script("return document.querySelector('.photo-card img').complete"))
        assert len(css(".photo-card .face-box")) == 1
        assert len(css(".photo-card .bar")) == 8
        assert [e.text for e in css(".photo-card .bar-row .name")] == list(ABAW_LABELS)
        box = css(".photo-card .face-box")[0]
        assert box.size["width"] > 20 and box.size["height"] > 20
        _shot(drv, "photos")
        drv.find_element(By.ID, "photo-csv").click()
        got = downloads / "predictions.csv"
        wait.until(lambda d: got.is_file() and not list(downloads.glob("*.crdownload")))
        assert got.read_text() == reference["photo"]

        # a file that is not an image: a message in the page, and the page keeps working
        choose("photo-input", media["text"])
        wait.until(lambda d: css(".photo-card .error"))
        assert "notes.txt: not an image" in css(".photo-card .error")[0].text
        assert not css(".face-box")
        choose("photo-input", media["big"])
        wait.until(lambda d: drv.find_element(By.ID, "photo-message").is_displayed())
        assert "upload too large" in drv.find_element(By.ID, "photo-message").text

        # Video: progress, then a timeline of the 8 classes and the files
        drv.get(server.url + "/#video")
        choose("video-input", media["clip"])
        drv.find_element(By.ID, "video-submit").click()
        wait.until(lambda d: drv.find_element(By.ID, "video-result").is_displayed())
        assert len(css("#video-timeline path.series")) == 8
        assert len(css("#video-files a")) == 4 and len(css("#video-thumbs img")) == 8
        assert "done: 9 frames, 7 faces" in drv.find_element(By.ID, "video-progress-text").text
        _shot(drv, "video")

        # Webcam: Chromium's fake camera plays the astronaut; frames go to the photo endpoint one after another
        drv.get(server.url + "/#webcam")
        drv.find_element(By.ID, "cam-start").click()
        frames = lambda: int(re.match(r"(\d+) frames", drv.find_element(By.ID, "cam-status").text or "0 frames")[1])  # noqa: E731
        wait.until(lambda d: frames() >= 3)
        assert "1 face(s)" in drv.find_element(By.ID, "cam-status").text
        assert len(css("#webcam .face-box")) == 1 and len(css("#cam-bars .bar")) == 8
        _shot(drv, "webcam")
        drv.find_element(By.ID, "cam-stop").click()

        # Runs: curves of the three runs, 8 threshold panels, confusion matrices, config
        drv.get(server.url + "/#runs")
        wait.until(lambda d: len(css("#chart-f1 path.series")) == 6)   # macro-F1 + accuracy per run
        assert len(css("#run-list .run-item")) == 3
        panels = css("#chart-thresholds .chart")
        assert len(panels) == 8 and all(p.find_elements(By.CSS_SELECTOR, "path.series") for p in panels)
        assert len(css("#chart-mask path.series")) == 2   # dtm and live (supervised accepts nothing)
        assert len(css("#confusions table.confusion")) == 3
        assert len(css("#chart-mix polygon.area")) == 2 * 8 and len(css("#chart-mix text.empty")) == 1   # not supervised
        assert "algorithm: dtm" in drv.execute_script("return document.querySelector('#configs pre').textContent")
        before = len(css("#chart-f1 circle"))
        with (runs / "live" / "metrics.jsonl").open("a") as f:   # the "live" run trains on
            f.write((runs / "live" / "rest.jsonl.txt").read_text())
        wait.until(lambda d: len(css("#chart-f1 circle")) == before + 3 * 2)   # its 3 new evals, F1 and accuracy
        _shot(drv, "runs")
    finally:
        drv.quit()
