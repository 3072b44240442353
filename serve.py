"""Show the trained model to someone: a web page and an HTTP API that label photos.

    python serve.py                     then open http://127.0.0.1:8000
    curl -F image=@x.jpg "http://127.0.0.1:8000/predict?top_k=3"

The page takes a photo dropped on it, picked or pasted, and shows its label, the likeliest
classes as bars, "unknown" under --min-confidence and the Grad-CAM heat map; it needs nothing
from the internet. The API answers POST /predict (a multipart form with the photo in the field
"image") and GET /health with JSON. An upload is decoded from memory by the code predict.py
uses (images.load_image_bytes, the same as images.load_image), so the same photo gets the same
numbers; nothing a client sends is written to disk. Concurrent requests share model calls
(classifier/batching.py). A bad upload gets one JSON error, {"error": "..."}, with a 4xx
status, and the server goes on. Ctrl-C or SIGTERM lets the requests in flight finish, then
exits 0.
"""

import argparse
import base64
import contextlib
import io
import logging
import os
import signal
import socket
import sys

import cv2
import numpy as np
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

import predict
from classifier import artifacts, batching, calibration, cli, heatmaps, images, inference
from classifier.cli import Range, UserError

log = logging.getLogger("serve")

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")
FIELD = "image"  # the form field that carries the photo
MEGABYTE = 1024 * 1024
OVERLAY_WIDTH = 400  # the heat map's picture, as wide as predict.py's annotated copies
RANGES = {"port": Range(0, 65535), "top_k": Range(1),
          "threshold": Range(0, 1, low_open=True, high_open=True),
          "min_confidence": Range(0, 1), "max_pixels": Range(1),
          "max_upload_mb": Range(0, low_open=True), "max_batch": Range(1),
          "batch_wait_ms": Range(0)}


def build_parser():
    parser = argparse.ArgumentParser(
        description="Serve a model trained by train.py: a web page and an HTTP API that label "
                    "photos.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 lets other machines in")
    server.add_argument("--port", type=int, default=8000, help="port to listen on; 0: any free "
                                                               "one (the log line names it)")
    labelling = parser.add_argument_group("model and labels")
    artifacts.add_model_flags(labelling)
    inference.add_tta_flag(labelling)
    labelling.add_argument("--top-k", type=int, default=5,
                           help="classes in each answer, likeliest first, unless a request "
                                "asks for another number (?top_k=)")
    inference.add_answer_flags(labelling, predict.UNKNOWN)
    limits = parser.add_argument_group("limits and batching")
    limits.add_argument("--max-upload-mb", type=float, default=20,
                        help="refuse larger uploads (413), before reading them")
    limits.add_argument("--max-pixels", type=int, default=images.DEFAULT_MAX_PIXELS,
                        help="refuse images whose header claims more pixels than this")
    limits.add_argument("--max-batch", type=int, default=32,
                        help="most images of concurrent requests labelled by one model call")
    limits.add_argument("--batch-wait-ms", type=float, default=5,
                        help="how long an image waits for others to share its model call")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and a line per request")
    return parser


class Labeller:
    """Labels batches of images with the model, and explains those that ask for it (Grad-CAM
    of their top class); called from the batcher's one worker thread."""

    def __init__(self, model, tta=False):
        self.model, self.tta = model, tta
        self.explainer = heatmaps.Explainer(model)

    def label_batch(self, items):
        """(probabilities, heat map or None) for each (pixels, explain) of items."""
        batch = np.stack([pixels for pixels, _ in items]).astype("float32")
        found = inference.probabilities(self.model, batch, self.tta)
        maps = [None] * len(items)
        wanted = [index for index, (_, explain) in enumerate(items) if explain]
        if wanted:
            for index, heat_map in zip(wanted, self.explainer.heat_maps(
                    batch[wanted], found[wanted].argmax(axis=1))):
                maps[index] = heat_map
        return list(zip(found, maps))


def describe(probabilities, classes, multi_label, top_k, threshold, min_confidence):
    """The answer to a request, from one image's probabilities: the top class and its
    probability, the top_k likeliest classes, the confidence, and the answer predict.py gives:
    the class, for a multi-label model the list of labels reaching threshold, or unknown when
    the confidence is under min_confidence."""
    sure = float(calibration.confidence(probabilities[None], multi_label)[0])
    chosen = predict.chosen_labels(probabilities, classes, multi_label, top_k, threshold)
    ranked = predict.chosen_labels(probabilities, classes, False, top_k, threshold)
    return {"label": ranked[0][0], "probability": ranked[0][1],
            "answer": predict.answer({"unknown": sure < min_confidence, "predictions": chosen},
                                     multi_label),
            "confidence": sure,
            "top_k": [{"label": label, "probability": probability}
                      for label, probability in ranked]}


async def _capped(stream, limit):
    """The chunks of stream, until more than limit bytes have come: then 413."""
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > limit:
            raise HTTPException(413, _too_large(limit))
        yield chunk


def _too_large(limit):
    return f"the upload is larger than {limit / MEGABYTE:g} MB (--max-upload-mb)"


async def read_upload(request, limit):
    """The bytes of the photo in the request's form field FIELD, at most limit of them, held
    in memory; an HTTPException (4xx) for anything else."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise HTTPException(415, f"send the photo as multipart/form-data, in a field named "
                                 f"'{FIELD}'")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, _too_large(limit))
    parser = MultiPartParser(request.headers, _capped(request.stream(), limit), max_files=1,
                             max_fields=16)
    # Starlette spools a file over 1 MB to a temporary file on disk; the body is capped at
    # limit, so with the spool's threshold there an upload never leaves memory.
    parser.spool_max_size = limit
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise HTTPException(400, f"not a multipart form this server can read: "
                                 f"{error.message}") from None
    try:
        upload = form.get(FIELD)
        if upload is None:
            sent = ", ".join(sorted(set(form.keys()))) or "nothing"
            raise HTTPException(422, f"no field '{FIELD}' in the form (it has: {sent})")
        if isinstance(upload, str):
            raise HTTPException(422, f"the field '{FIELD}' holds text, not a file")
        return await upload.read()
    finally:
        await form.close()


def heat_map_picture(data, heat_map, max_pixels):
    """The uploaded photo, OVERLAY_WIDTH wide at most, with heat_map over it, as a JPEG data
    URL for the page or any client to show."""
    picture = images.decode_image(io.BytesIO(data), max_pixels, min_side=OVERLAY_WIDTH)
    height, width = picture.shape[:2]
    if width > OVERLAY_WIDTH:
        height = max(1, round(height * OVERLAY_WIDTH / width))
        picture = cv2.resize(picture, (OVERLAY_WIDTH, height), interpolation=cv2.INTER_AREA)
    encoded = cv2.imencode(".jpg", cv2.cvtColor(heatmaps.overlay(picture, heat_map),
                                                cv2.COLOR_RGB2BGR))[1]
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def _error(status, message, headers=None):
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(model, classes, multi_label, model_name, *, top_k=5, threshold=0.5,
               min_confidence=0.0, tta=False, max_pixels=images.DEFAULT_MAX_PIXELS,
               max_upload_bytes=20 * MEGABYTE, max_batch=32, batch_wait_s=0.005):
    """The web application: the page at /, POST /predict, GET /health."""
    labeller = Labeller(model, tta)
    # The model's first calls trace its TensorFlow graph, the second for any batch size, and
    # the heat maps' first call theirs: done here, not to the first visitors.
    blank = np.zeros(model.input_shape[1:], np.uint8)
    labeller.label_batch([(blank, True)])
    labeller.label_batch([(blank, False)] * 2)
    batcher = batching.Batcher(labeller.label_batch, max_batch, batch_wait_s)
    image_size = model.input_shape[1]
    with open(PAGE, encoding="utf-8") as handle:
        page = handle.read()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    # No /docs: FastAPI's interactive docs load their scripts from the internet.
    app = FastAPI(title="image classifier", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request, error):
        return _error(error.status_code, error.detail, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, error):
        return _error(422, "; ".join(f"{' '.join(map(str, problem['loc']))}: {problem['msg']}"
                                     for problem in error.errors()))

    @app.get("/", response_class=HTMLResponse)
    async def home():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "classes": classes,
                "multi_label": multi_label, "image_size": image_size, "top_k": top_k,
                "threshold": threshold, "min_confidence": min_confidence}

    @app.post("/predict")
    async def predict_photo(request: Request, top_k: int = Query(top_k, ge=1),
                            explain: bool = False):
        log.debug("an upload of %s bytes", request.headers.get("content-length", "unknown"))
        data = await read_upload(request, max_upload_bytes)
        try:
            # Decoding runs beside the event loop, which goes on taking requests.
            pixels = await run_in_threadpool(images.load_image_bytes, data, image_size,
                                             max_pixels)
        except images.TooManyPixels as error:
            raise HTTPException(413, str(error)) from None
        except images.ImageError as error:
            raise HTTPException(415, f"not an image this server can read: {error}") from None
        probabilities, heat_map = await batcher.submit((pixels, explain))
        answer = describe(probabilities, classes, multi_label, min(top_k, len(classes)),
                          threshold, min_confidence)
        if heat_map is not None:
            answer["heatmap"] = await run_in_threadpool(heat_map_picture, data, heat_map,
                                                        max_pixels)
        return answer

    return app


def listen(host, port):
    """A socket listening on host:port, so that a port in use is one clear line."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        # With its protocol named (socket.create_server leaves it 0), so that asyncio turns
        # Nagle's algorithm off on each connection: with it on, every answer waited 40 ms
        # for the client's delayed acknowledgement.
        sock = socket.socket(family, kind, protocol)
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error} "
                        "(--host)") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen()
    except OSError as error:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error} "
                        "(--host, --port)") from None
    return sock


def serve(args):
    cli.check_ranges(args, RANGES)
    # Before the model loads, so that a port in use is said at once; a request that comes
    # meanwhile waits in the socket's queue.
    sock = listen(args.host, args.port)
    model, classes, multi_label = predict.load_trained(args)
    model_name = artifacts.model_path(args.model, args.labels)
    app = create_app(model, classes, multi_label, model_name, top_k=args.top_k,
                     threshold=args.threshold, min_confidence=args.min_confidence,
                     tta=args.tta, max_pixels=args.max_pixels,
                     max_upload_bytes=int(args.max_upload_mb * MEGABYTE),
                     max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=args.verbose))
    # uvicorn catches Ctrl-C and SIGTERM itself, finishes the requests in flight, then raises
    # the signal again for these handlers: by then the server has stopped as asked, so that
    # is a clean exit, not an interruption.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    log.info("serving %s on http://%s:%d (Ctrl-C stops)", model_name,
             f"[{host}]" if ":" in host else host, port)
    server.run(sockets=[sock])
    log.info("stopped")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    return cli.run(lambda: serve(args), log)


if __name__ == "__main__":
    sys.exit(main())
