"""Headless Chromium driven through the DevTools protocol over a pipe (--remote-debugging-pipe),
for the tests that use a page as a person would: a file chosen in a file input, and what the
page then shows.

Over the pipe the protocol's messages are JSON, each ended by a NUL byte: Chromium reads them
from its file descriptor 3 and writes its own to its 4. No websocket client and no
browser-automation package are needed.
"""

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile

CHROMIUM = shutil.which("chromium")
# As root and without a GPU; and no connections of its own: this machine has no internet.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe"]


def _above_four(fd):
    """fd under a number above 4, so that moving it to 3 or 4 in Chromium moves nothing else."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5)
    os.close(fd)
    return moved


class ProtocolError(Exception):
    """Chromium answered a command with an error."""


class Chromium:
    """One headless Chromium; page(url) opens a tab and returns its session, for call()."""

    def __init__(self, window=(1100, 1000), timeout=120):
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory()
        commands, self._to_browser = os.pipe()
        self._from_browser, answers = os.pipe()
        commands, answers = _above_four(commands), _above_four(answers)
        # bash moves the pipes to where Chromium looks for them, fds 3 and 4 (sh may not take
        # file descriptors over 9).
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{commands} 4>&{answers} {commands}<&- '
                           f'{answers}>&-', CHROMIUM, *FLAGS,
             f"--window-size={window[0]},{window[1]}",
             f"--user-data-dir={self._profile.name}", "about:blank"],
            pass_fds=(commands, answers), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(commands)
        os.close(answers)
        self._buffer = b""
        self._last_id = 0
        self._events = []

    def close(self):
        os.close(self._to_browser)  # Chromium quits when its pipe closes
        try:
            self.process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._from_browser)
        self._profile.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def call(self, method, session=None, **params):
        """Send a command, and return its result once Chromium answers it."""
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._receive()
            if answer.get("id") == self._last_id:
                if "error" in answer:
                    raise ProtocolError(f"{method}: {answer['error']}")
                return answer["result"]
            self._events.append(answer)

    def wait_for_event(self, method, session):
        """The parameters of the first event method of session, waiting for it if need be."""
        while True:
            for event in self._events:
                if event.get("method") == method and event.get("sessionId") == session:
                    self._events.remove(event)
                    return event["params"]
            self._events.append(self._receive())

    def page(self, url):
        """A new tab showing url, loaded: its session."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session)
        self.call("Page.navigate", session, url=url)
        self.wait_for_event("Page.loadEventFired", session)
        return session

    def evaluate(self, session, expression):
        """The value of a JavaScript expression in the page; a promise's, once it settles."""
        result = self.call("Runtime.evaluate", session, expression=expression,
                           awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise ProtocolError(result["exceptionDetails"].get("exception", {}).get(
                "description", result["exceptionDetails"]["text"]))
        return result["result"].get("value")

    def choose_file(self, session, selector, path):
        """Choose path in the page's file input, as a person does with the file picker."""
        document = self.call("DOM.getDocument", session)["root"]["nodeId"]
        node = self.call("DOM.querySelector", session, nodeId=document,
                         selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", session, nodeId=node, files=[os.path.abspath(path)])

    def screenshot(self, session, path):
        data = self.call("Page.captureScreenshot", session, format="png")["data"]
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(data))

    def _receive(self):
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], self.timeout)
            if not ready:
                raise TimeoutError(f"Chromium said nothing for {self.timeout} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise ProtocolError("Chromium closed its pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)
