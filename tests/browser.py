"""Headless Chromium in a session, driven over the DevTools protocol: load a page, read its
DOM, click a button and wait for the page the click leads to.

`chromium --dump-dom` and `--screenshot` (tests/test_flower.py) load one page and exit;
submitting a form needs a browser that stays. Chromium's remote debugging speaks JSON over
a websocket, and tornado (Flower's web server, installed with it) has a websocket client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tornado.websocket import WebSocketClientConnection, websocket_connect

from tests.harness import wait_for
from tests.test_flower import CHROMIUM_FLAGS

TIMEOUT = 30.0


class Browser:
    """One headless Chromium with one tab (its own profile: no cookie or login shared)."""

    def __init__(self, tmp_path: Path) -> None:
        exe = shutil.which("chromium")
        assert exe, "needs Debian's chromium on PATH (`make test` installs it)"
        profile = tmp_path / f"chromium-{uuid.uuid4().hex[:8]}"
        flags = [f for f in CHROMIUM_FLAGS if not f.startswith("--virtual-time-budget")]
        self.process = subprocess.Popen(
            [exe, *flags, "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its helper processes go with it
        )
        self.loop = asyncio.new_event_loop()
        self.events: list[dict[str, Any]] = []
        self.last_id = 0
        try:
            active = profile / "DevToolsActivePort"  # Chromium writes its port there
            port = wait_for(lambda: active.exists() and active.read_text().split("\n")[0], 30)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                tab = next(t for t in json.loads(r.read()) if t["type"] == "page")
            self.socket: WebSocketClientConnection = self._run(
                lambda: websocket_connect(tab["webSocketDebuggerUrl"], max_message_size=64 << 20)
            )
            self.send("Page.enable")
        except BaseException:
            self.close()
            raise

    def _run(self, start: Callable[[], Awaitable[Any]]) -> Any:
        """Run `start()` in the browser's event loop: tornado makes its futures on the loop
        running when it is called."""

        async def run() -> Any:
            return await asyncio.wait_for(start(), TIMEOUT)

        return self.loop.run_until_complete(run())

    def _receive(self) -> dict[str, Any]:
        raw = self._run(self.socket.read_message)
        assert raw is not None, "chromium closed the DevTools connection"
        message: dict[str, Any] = json.loads(raw)
        return message

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a DevTools method and return its result (events met meanwhile are kept)."""
        self.last_id += 1
        self._run(
            lambda: self.socket.write_message(
                json.dumps({"id": self.last_id, "method": method, "params": params})
            )
        )
        while True:
            message = self._receive()
            if message.get("id") == self.last_id:
                assert "error" not in message, (method, message["error"])
                result: dict[str, Any] = message.get("result", {})
                return result
            self.events.append(message)

    def _next_event(self) -> dict[str, Any]:
        return self.events.pop(0) if self.events else self._receive()

    def _loaded(self, loader: str | None = None) -> None:
        """Wait until the tab's main frame has navigated (with this loader, if given) and
        that page's load event has fired; earlier pages' events are passed over."""
        navigated = False
        while True:
            event = self._next_event()
            if event.get("method") == "Page.frameNavigated":
                frame = event["params"]["frame"]
                if "parentId" not in frame and loader in (None, frame["loaderId"]):
                    navigated = True
            elif event.get("method") == "Page.loadEventFired" and navigated:
                return

    def goto(self, url: str) -> str:
        """Load a page and return its DOM once it has loaded."""
        self.events.clear()
        self._loaded(self.send("Page.navigate", url=url)["loaderId"])
        return self.dom()

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        reply = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in reply, reply["exceptionDetails"]
        return reply["result"].get("value")

    def follow(self, expression: str) -> str:
        """Run an expression that navigates (a click on a link or a form's button) and
        return the DOM of the page it leads to."""
        self.events.clear()
        self.evaluate(expression)
        self._loaded()
        return self.dom()

    def dom(self) -> str:
        """The page's DOM as HTML, as Chromium holds it now."""
        return str(self.evaluate("document.documentElement.outerHTML"))

    def close(self) -> None:
        """Stop Chromium and everything it started."""
        with contextlib.suppress(Exception):
            self.socket.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.loop.close()
