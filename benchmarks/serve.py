"""How fast does serve.py answer, alone and under load? Requests/s and latency with 1, 4 and 16
concurrent clients, against predict.py's images/s on the same photos.

    python benchmarks/serve.py --photos /work/shared/data/clothing-dataset-small/test \
        --labels Output/labels.pickle

--count photos of --photos (spread over its classes) are read into memory once. serve.py is
started on 127.0.0.1 on a free port (its own process, as a user starts it), and for each
number of clients (--clients) that many threads send --requests uploads between them, each
client one request after another on its own connection, until they are sent or --seconds
have passed; then once more, at the most clients, with --max-batch 1 (a model call per
request: what batching is measured against). The server is stopped with SIGTERM, which must
give exit code 0.

predict.py's rows: the same photos through predict.py's own labelling (predict.Labeller,
--batch-size 32, no annotated copies) with the model loaded and warmed, as the server's is;
and the whole command, `predict.py --image <photos> --no-annotate --format csv --results
/dev/null`, its start-up and model loading included; both with --explain when the uploads
ask for heat maps.

The clients run on the server's machine and share its cores: on a machine with few cores
they take some of the time the server would have.
"""

import argparse
import http.client
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import predict  # noqa: E402
from classifier import images  # noqa: E402

BOUNDARY = "benchmark-boundary"


def build_parser():
    parser = argparse.ArgumentParser(
        description="serve.py's requests/s and latency under 1, 4 and 16 concurrent clients, "
                    "against predict.py's images/s on the same photos.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--photos", required=True,
                        help="a folder of photos (one sub-folder per class, or not)")
    parser.add_argument("--count", type=int, default=200, help="photos taken from --photos")
    parser.add_argument("--model", default=None, help="serve.py's and predict.py's --model")
    parser.add_argument("--labels", default=os.path.join("Output", "labels.pickle"),
                        help="serve.py's and predict.py's --labels")
    parser.add_argument("--clients", default="1,4,16",
                        help="numbers of concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=200,
                        help="uploads sent at each number of clients")
    parser.add_argument("--seconds", type=float, default=120,
                        help="at each number of clients, no upload starts after this")
    parser.add_argument("--explain", action="store_true",
                        help="ask for the heat map with every upload (?explain=1), and run "
                             "predict.py with --explain")
    parser.add_argument("--max-batch", type=int, default=32, help="serve.py's --max-batch")
    parser.add_argument("--batch-wait-ms", type=float, default=5,
                        help="serve.py's --batch-wait-ms")
    return parser


def pick_photos(folder, count):
    """count image files of folder, spread evenly over its sorted list (so over its
    classes)."""
    found = images.list_images(folder)
    if not found:
        sys.exit(f"no images in {folder}")
    return [found[int(index)] for index in np.linspace(0, len(found) - 1,
                                                       min(count, len(found)))]


def form(path):
    """The body of a POST /predict with path's bytes in the field "image", and its type."""
    with open(path, "rb") as handle:
        content = handle.read()
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="{os.path.basename(path)}"\r\n\r\n').encode() + content + \
        f"\r\n--{BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={BOUNDARY}"


class Server:
    """serve.py in its own process on 127.0.0.1, on a port the system picks."""

    def __init__(self, model_flags, *flags):
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "serve.py"), *model_flags, "--host",
             "127.0.0.1", "--port", "0", *flags], stderr=subprocess.PIPE, text=True)
        for line in self.process.stderr:
            found = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                break
        else:
            sys.exit(f"serve.py stopped before serving (exit code {self.process.wait()})")
        # Keep reading its log, so that the pipe never fills and blocks the server.
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=300)


def load(port, bodies, clients, requests, seconds, query):
    """clients threads sending requests uploads of bodies between them: (answered,
    seconds, latencies in seconds)."""
    deadline = time.perf_counter() + seconds
    counter = iter(range(requests))
    lock = threading.Lock()

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        latencies = []
        while time.perf_counter() < deadline:
            with lock:
                index = next(counter, None)
            if index is None:
                break
            body, content_type = bodies[index % len(bodies)]
            started = time.perf_counter()
            connection.request("POST", "/predict" + query, body,
                               {"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"serve.py answered {response.status}")
            latencies.append(time.perf_counter() - started)
        connection.close()
        return latencies

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = [value for done in pool.map(lambda _: client(), range(clients))
                     for value in done]
    return len(latencies), time.perf_counter() - started, np.array(latencies)


def serve_rows(args, model_flags, bodies, query):
    rows = []
    levels = [int(value) for value in args.clients.split(",")]
    for name, flags, counts in (
            ("serve.py", ["--max-batch", str(args.max_batch), "--batch-wait-ms",
                          str(args.batch_wait_ms)], levels),
            ("serve.py --max-batch 1", ["--max-batch", "1"], levels[-1:])):
        server = Server(model_flags, *flags)
        load(server.port, bodies, 1, min(8, len(bodies)), args.seconds, query)  # warm-up
        for clients in counts:
            answered, seconds, latencies = load(server.port, bodies, clients, args.requests,
                                                args.seconds, query)
            rows.append((name, clients, answered, answered / seconds,
                         np.percentile(latencies, 50) * 1000,
                         np.percentile(latencies, 99) * 1000))
            print(f"{name}, {clients} clients: {rows[-1][3]:.1f} requests/s", flush=True)
        code = server.stop()
        if code != 0:
            sys.exit(f"serve.py stopped with exit code {code} after SIGTERM, not 0")
    return rows


def predict_rows(photos, model_flags, explain):
    with tempfile.TemporaryDirectory() as heat_maps:
        # --explain writes each heat map into --output: a folder that goes away after.
        flags = ["--image", *photos, "--no-annotate", "--format", "csv", "--results",
                 os.devnull, *model_flags] + (["--explain", "--output", heat_maps] * explain)
        args = predict.build_parser().parse_args(flags)
        labeller = predict.Labeller(args, *predict.load_trained(args))
        batches = [photos[start:start + args.batch_size]
                   for start in range(0, len(photos), args.batch_size)]
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            labeller.label(batches[0], pool, False)  # warm-up: the model's first call traces
            started = time.perf_counter()
            for batch in batches:
                labeller.label(batch, pool, False)
            warm = time.perf_counter() - started
        started = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), *flags], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        whole = time.perf_counter() - started
    return [("predict.py, model loaded and warm", len(photos) / warm),
            ("predict.py, the whole command", len(photos) / whole)]


def main(argv=None):
    args = build_parser().parse_args(argv)
    photos = pick_photos(args.photos, args.count)
    model_flags = (["--model", args.model] if args.model else []) + ["--labels", args.labels]
    bodies = [form(path) for path in photos]
    query = "?explain=1" if args.explain else ""
    print(f"{len(photos)} photos of {args.photos}, {os.cpu_count()} CPU cores", flush=True)
    rows = serve_rows(args, model_flags, bodies, query)
    alone = predict_rows(photos, model_flags, args.explain)
    print("\n| what | clients | requests | requests/s | p50 latency | p99 latency |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, clients, answered, rate, p50, p99 in rows:
        print(f"| `{name}` | {clients} | {answered} | {rate:.1f} | {p50:.0f} ms | {p99:.0f} ms |")
    for name, rate in alone:
        print(f"| {name} | | {len(photos)} images | {rate:.1f} images/s | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
