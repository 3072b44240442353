"""serve.py: the page in a real browser, the API's answers equal to predict.py's, every bad
upload refused with a JSON error while the server goes on, batching, and a graceful stop."""

import asyncio
import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import predict
import serve
from chromium import CHROMIUM, Chromium
from classifier import batching, images
from conftest import ROOT
from messy import bad_files, odd_files


def model_flags(trained_run):
    return ["--model", os.path.join(trained_run["output"], "vgg_model.keras"),
            "--labels", os.path.join(trained_run["output"], "labels.pickle")]


def photo(trained_run, name="red_dress_0000.jpg"):
    return os.path.join(trained_run["dataset"], name.rsplit("_", 1)[0], name)


def jpeg_bytes(pixels):
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(trained_run):
    """The application in this process, with a 1 MB upload limit."""
    args = serve.build_parser().parse_args(model_flags(trained_run))
    model, classes, multi_label = predict.load_trained(args)
    app = serve.create_app(model, classes, multi_label, args.model,
                           max_upload_bytes=serve.MEGABYTE)
    with TestClient(app) as client:
        yield client


def test_every_numeric_flag_has_a_range():
    numeric = {action.dest for action in serve.build_parser()._actions
               if action.type in (int, float)}
    assert numeric and numeric <= set(serve.RANGES)


def test_a_port_in_use_is_one_line_and_exit_code_2(trained_run, caplog):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert serve.main([*model_flags(trained_run), "--port", str(port)]) == 2
    assert (f"cannot listen on 127.0.0.1:{port}: Address already in use (--host, --port)"
            in caplog.text)


def test_a_value_out_of_range_is_one_line_naming_it(trained_run, caplog):
    assert serve.main([*model_flags(trained_run), "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1, got 0" in caplog.text


@pytest.mark.parametrize("name", ["red_dress_0000.jpg", "png_named.jpg", "cmyk.jpg"])
def test_the_api_gives_predict_pys_numbers_for_the_same_file(trained_run, client, tmp_path,
                                                            capsys, name):
    path = photo(trained_run, name) if name.startswith("red") else str(tmp_path / name)
    if not name.startswith("red"):
        (tmp_path / name).write_bytes(odd_files()[name])
    classes = client.get("/health").json()["classes"]
    results = tmp_path / "results.json"
    assert predict.main(["--image", path, *model_flags(trained_run), "--format", "json",
                         "--top-k", str(len(classes)), "--no-annotate",
                         "--results", str(results)]) == 0
    expected = json.loads(results.read_text())[0]["predictions"]
    with open(path, "rb") as handle:
        response = client.post(f"/predict?top_k={len(classes)}", files={"image": handle})
    assert response.status_code == 200
    answer = response.json()
    assert [entry["label"] for entry in answer["top_k"]] == [p["label"] for p in expected]
    np.testing.assert_allclose([entry["probability"] for entry in answer["top_k"]],
                               [p["probability"] for p in expected], atol=1e-6)
    assert answer["label"] == answer["answer"] == expected[0]["label"]
    assert answer["probability"] == answer["confidence"] == answer["top_k"][0]["probability"]
    assert "heatmap" not in answer


def test_the_heat_map_comes_on_request_over_the_photo(trained_run, client):
    with open(photo(trained_run), "rb") as handle:
        answer = client.post("/predict?explain=1&top_k=2", files={"image": handle}).json()
    assert len(answer["top_k"]) == 2
    header, data = answer["heatmap"].split(",", 1)
    assert header == "data:image/jpeg;base64"
    overlay = images.decode_image(io.BytesIO(base64.b64decode(data)))
    assert overlay.shape == images.decode_image(photo(trained_run)).shape


def test_health_names_the_model_and_its_classes(trained_run, client):
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["classes"] == sorted(os.listdir(trained_run["dataset"]))
    assert health["model"].endswith("vgg_model.keras") and health["multi_label"] is False


def multipart(field, filename, content, boundary="serve-test"):
    """A multipart/form-data body of one part, and its content type."""
    disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
    body = (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content
            + f"\r\n--{boundary}--\r\n".encode())
    return body, f"multipart/form-data; boundary={boundary}"


def bad_requests():
    """name -> (keyword arguments of a POST to /predict, status, words of the error)."""
    noise = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    huge = io.BytesIO()
    Image.fromarray(noise).save(huge, "BMP")  # 1.5 MB: over the 1 MB of the client fixture
    requests = {name: ({"files": {"image": (name, content)}}, 413 if "bomb" in name else 415,
                       reason) for name, (content, reason) in bad_files().items()}
    empty_body, empty_type = b"--serve-test--\r\n", "multipart/form-data; boundary=serve-test"
    text_body, text_type = multipart("image", None, b"not a file")
    huge_body, huge_type = multipart("image", "big.bmp", huge.getvalue())
    chunks = (huge_body[start:start + 65536] for start in range(0, len(huge_body), 65536))
    requests.update({
        "too large": ({"files": {"image": ("big.bmp", huge.getvalue())}}, 413, "larger than 1 MB"),
        # No Content-Length to refuse it by: the server counts as the body comes.
        "too large, in chunks": ({"content": chunks, "headers": {"content-type": huge_type}},
                                 413, "larger than 1 MB"),
        "empty form": ({"content": empty_body, "headers": {"content-type": empty_type}}, 422,
                       "no field 'image' in the form (it has: nothing)"),
        "wrong field": ({"files": {"photo": ("x.jpg", jpeg_bytes(noise[:40, :40]))}}, 422,
                        "no field 'image' in the form (it has: photo)"),
        "text field": ({"content": text_body, "headers": {"content-type": text_type}}, 422,
                       "holds text, not a file"),
        "not a form": ({"json": {"image": "x.jpg"}}, 415, "multipart/form-data"),
        "no boundary": ({"content": b"x", "headers": {"content-type": "multipart/form-data"}},
                        400, "boundary"),
        "two files": ({"files": [("image", ("a.jpg", b"a")), ("image", ("b.jpg", b"b"))]}, 400,
                      "Too many files"),
    })
    return requests


@pytest.mark.parametrize("name", sorted(bad_requests()))
def test_a_bad_upload_gets_one_json_error_and_the_next_is_served(trained_run, client, name):
    request, status, words = bad_requests()[name]
    response = client.post("/predict", **request)
    assert response.status_code == status
    assert list(response.json()) == ["error"] and words in response.json()["error"]
    with open(photo(trained_run), "rb") as handle:
        assert client.post("/predict", files={"image": handle}).status_code == 200


def test_bad_query_values_and_paths_get_json_errors(client):
    response = client.post("/predict?top_k=0", files={"image": ("x.jpg", b"")})
    assert response.status_code == 422 and "top_k" in response.json()["error"]
    assert client.get("/nowhere").json() == {"error": "Not Found"}


def test_an_upload_over_a_megabyte_never_touches_the_disk(trained_run, monkeypatch):
    # Starlette spools uploads over 1 MB to a temporary file: that must not happen here.
    def no_disk(self):
        raise AssertionError("an upload was spooled to disk")

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", no_disk)
    args = serve.build_parser().parse_args(model_flags(trained_run))
    model, classes, multi_label = predict.load_trained(args)
    app = serve.create_app(model, classes, multi_label, args.model)
    noise = np.random.default_rng(1).integers(0, 255, (800, 800, 3), dtype=np.uint8)
    picture = io.BytesIO()
    Image.fromarray(noise).save(picture, "BMP")
    assert len(picture.getvalue()) > 1024 * 1024
    with TestClient(app) as client:
        response = client.post("/predict", files={"image": ("noise.bmp", picture.getvalue())})
    assert response.status_code == 200


@pytest.mark.parametrize("probabilities, min_confidence, answer", [
    ([0.1, 0.7, 0.6], 0.0, ["dress", "red"]),  # the labels reaching the threshold
    ([0.1, 0.7, 0.6], 0.65, "unknown"),  # red's yes (0.6) is less sure than 0.65
    ([0.02, 0.9, 0.95], 0.65, ["red", "dress"]),
    ([0.1, 0.2, 0.3], 0.0, []),
])
def test_a_multi_label_answer_is_every_label_at_the_threshold(probabilities, min_confidence,
                                                              answer):
    described = serve.describe(np.array(probabilities), ["blue", "dress", "red"], True, 2, 0.5,
                               min_confidence)
    assert described["answer"] == answer
    assert [entry["label"] for entry in described["top_k"]] == [
        ["blue", "dress", "red"][index] for index in np.argsort(probabilities)[::-1][:2]]


def test_a_single_label_answer_is_unknown_under_min_confidence():
    probabilities = np.array([0.2, 0.5, 0.3])
    sure = serve.describe(probabilities, ["a", "b", "c"], False, 3, 0.5, 0.5)
    unsure = serve.describe(probabilities, ["a", "b", "c"], False, 3, 0.5, 0.51)
    assert (sure["answer"], unsure["answer"]) == ("b", "unknown")
    assert unsure["label"] == "b" and unsure["confidence"] == 0.5


def test_requests_that_arrive_while_the_model_works_share_its_next_call():
    calls, first_call_started, release = [], threading.Event(), threading.Event()

    def work(items):
        calls.append(items)
        first_call_started.set()
        release.wait()
        return [item * 10 for item in items]

    async def scenario():
        batcher = batching.Batcher(work, max_batch=4, wait_s=0)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.to_thread(first_call_started.wait)
        later = [asyncio.ensure_future(batcher.submit(item)) for item in range(1, 7)]
        await asyncio.sleep(0)  # each submission queues its item
        release.set()
        results = await asyncio.gather(first, *later)
        await batcher.stop()
        return results

    assert asyncio.run(scenario()) == [0, 10, 20, 30, 40, 50, 60]
    assert calls == [[0], [1, 2, 3, 4], [5, 6]]


def test_a_failing_batch_fails_its_requests_not_the_batcher():
    def work(items):
        if "bad" in items:
            raise ValueError("no")
        return items

    async def scenario():
        batcher = batching.Batcher(work, max_batch=1, wait_s=0)
        await batcher.start()
        with pytest.raises(ValueError):
            await batcher.submit("bad")
        result = await batcher.submit("good")
        await batcher.stop()
        return result

    assert asyncio.run(scenario()) == "good"


class Server:
    """python serve.py in a subprocess on a free port; its log lines collected as they come."""

    def __init__(self, trained_run, *flags):
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "serve.py"), *model_flags(trained_run),
             "--port", "0", *flags], stderr=subprocess.PIPE, text=True)
        self.lines, self.changed = [], threading.Condition()
        threading.Thread(target=self._collect, daemon=True).start()
        self.url = self.wait_for(r"serving .* on (http://\S+)").group(1)
        self.host, self.port = self.url[len("http://"):].rsplit(":", 1)

    def _collect(self):
        for line in self.process.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append(None)  # the end of the log
            self.changed.notify_all()

    def wait_for(self, pattern, count=1):
        """The count-th match of pattern in the log, once it is there."""
        with self.changed:
            while True:
                matches = [found for found in (re.search(pattern, line) for line in self.lines
                                               if line) if found]
                if len(matches) >= count:
                    return matches[count - 1]
                assert None not in self.lines, f"{pattern} never came:\n{self.log()}"
                # A guard against a hung server, not a measure: the line comes in seconds.
                assert self.changed.wait(timeout=600), f"no log line for 600 s:\n{self.log()}"

    def log(self):
        return "".join(line for line in self.lines if line)

    def connection(self):
        return http.client.HTTPConnection(self.host, int(self.port), timeout=120)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


@pytest.fixture(scope="module")
def server(trained_run):
    running = Server(trained_run, "--max-upload-mb", "1")
    yield running
    assert running.stop() == 0


@pytest.mark.slow
def test_an_oversized_upload_is_refused_before_its_body_is_sent(trained_run, server):
    connection = server.connection()
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Type", "multipart/form-data; boundary=serve-test")
    connection.putheader("Content-Length", str(10 ** 9))
    connection.endheaders()  # and not one byte of the gigabyte
    response = connection.getresponse()
    assert response.status == 413 and "larger than 1 MB" in json.loads(response.read())["error"]
    connection.close()
    body, content_type = multipart("image", "x.jpg", open(photo(trained_run), "rb").read())
    connection = server.connection()
    connection.request("POST", "/predict", body, {"Content-Type": content_type})
    assert connection.getresponse().status == 200


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM, reason="needs Chromium (Debian: apt-get install chromium)")
def test_the_page_labels_a_photo_chosen_in_a_real_browser(trained_run, server, tmp_path):
    path = photo(trained_run)
    with open(path, "rb") as handle:
        expected = json.loads(_post(server, handle.read(), "?top_k=5"))
    with Chromium() as browser:
        page = browser.page(server.url + "/")
        browser.evaluate(page, "window.labelled = new Promise((resolve) => document."
                               "addEventListener('labelled', (e) => resolve(e.detail))); null")
        browser.choose_file(page, "#file", path)
        shown = browser.evaluate(page, "window.labelled")
        assert "error" not in shown, shown
        assert browser.evaluate(page, "document.getElementById('answer').textContent") == \
            expected["answer"]
        bars = browser.evaluate(page, "[...document.querySelectorAll('#bars tr')].map("
                                      "(row) => row.cells[0].textContent)")
        assert bars == [entry["label"] for entry in expected["top_k"]]
        # The heat map is on screen: a picture the browser decoded, the photo's size.
        width = browser.evaluate(page, "document.getElementById('heatmap').decode().then("
                                       "() => document.getElementById('heatmap').naturalWidth)")
        assert width == images.decode_image(path).shape[1]
        browser.screenshot(page, tmp_path / "page.png")
    assert images.decode_image(str(tmp_path / "page.png")).shape[1] == 1100


def _post(server, content, query=""):
    body, content_type = multipart("image", "x.jpg", content)
    connection = server.connection()
    connection.request("POST", "/predict" + query, body, {"Content-Type": content_type})
    response = connection.getresponse()
    assert response.status == 200
    return response.read()


@pytest.mark.slow
def test_sigterm_lets_the_requests_in_flight_finish_then_exits_0(trained_run):
    running = Server(trained_run, "--verbose")
    try:
        body, content_type = multipart("image", "x.jpg", open(photo(trained_run), "rb").read())
        connections = []
        for _ in range(4):
            connection = running.connection()
            connection.putrequest("POST", "/predict")
            connection.putheader("Content-Type", content_type)
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders()
            connection.send(body[:-10])  # the rest only once the server is stopping
            connections.append(connection)
        running.wait_for(r"an upload of", count=len(connections))
        running.process.send_signal(signal.SIGTERM)
        # Logged once it stopped listening.
        running.wait_for(r"Waiting for connections to close")
        with pytest.raises(ConnectionRefusedError):  # no new requests
            running.connection().request("GET", "/health")
        for connection in connections:
            connection.send(body[-10:])
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["label"]
        assert running.process.wait(timeout=120) == 0
        assert "Traceback" not in running.log()
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()
