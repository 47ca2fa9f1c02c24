"""Headless Chromium opens the status page behind basic auth.

The endpoint requires credentials (as on a pod network); the browser gets the ``Basic``
challenge, answers it through the DevTools ``Fetch`` domain (as a person would in the login
dialog), and shows the study list, the study page and its preview image. Cancelling the dialog
leaves the 401 page.
"""

from __future__ import annotations

import queue
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.security.test_http_auth import start_site
from tests.support.ohif import DevToolsPipe, Page, artifacts_dir, find_chromium

pytestmark = [pytest.mark.viewer, pytest.mark.integration, pytest.mark.timeout(120)]


class AuthAnswerer:
    """Answers Chromium's auth challenges for one page from a thread of its own.

    The DevTools reader thread delivers the events; answering from it would wait on itself.
    """

    def __init__(self, page: Page) -> None:
        self.page = page
        self.credentials: tuple[str, str] | None = None
        self.challenges: list[str] = []
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        page.pipe.add_listener(self._on_event)
        self._thread = threading.Thread(target=self._run, name="auth-answerer", daemon=True)
        self._thread.start()
        page.send("Fetch.enable", {"handleAuthRequests": True, "patterns": [{"urlPattern": "*"}]})

    def _on_event(self, message: dict[str, Any]) -> None:
        if message.get("sessionId") == self.page.session_id and str(
            message.get("method", "")
        ).startswith("Fetch."):
            self._events.put(message)

    def _run(self) -> None:
        while (message := self._events.get()) is not None:
            params = message["params"]
            if message["method"] == "Fetch.requestPaused":
                self.page.send("Fetch.continueRequest", {"requestId": params["requestId"]})
                continue
            self.challenges.append(params["authChallenge"]["scheme"])
            if self.credentials is None:
                answer = {"response": "CancelAuth"}
            else:
                user, password = self.credentials
                answer = {"response": "ProvideCredentials", "username": user, "password": password}
            self.page.send(
                "Fetch.continueWithAuth",
                {"requestId": params["requestId"], "authChallengeResponse": answer},
            )

    def close(self) -> None:
        self._events.put(None)
        self._thread.join(5)


def test_chromium_opens_the_status_page_with_basic_auth(tmp_path: Path) -> None:
    chromium = find_chromium()
    assert chromium is not None, "Chromium is not installed (Debian package 'chromium')"
    site = start_site(tmp_path)
    artifacts = artifacts_dir()
    artifacts.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{site.port}"
    with tempfile.TemporaryDirectory(prefix="d2r-chromium-") as profile:
        pipe = DevToolsPipe(chromium, Path(profile), artifacts / "status-auth-chromium.log")
        answerer: AuthAnswerer | None = None
        try:
            page = Page(pipe)
            for domain in ("Page", "Runtime"):
                page.send(f"{domain}.enable")
            answerer = AuthAnswerer(page)

            # The login dialog cancelled: the 401 answer is all the page shows.
            page.send("Page.navigate", {"url": base + "/"})
            text = page.wait_for(
                "document.readyState === 'complete' && document.body && document.body.innerText",
                30,
                "the 401 page",
            )
            assert "unauthorized" in text and site.study not in text
            assert answerer.challenges and answerer.challenges[0] == "basic"

            # The viewer user logs in: the study list, then the study with its preview image.
            answerer.credentials = ("viewer-user", site.passwords["viewer"])
            page.send("Page.navigate", {"url": base + "/"})
            page.wait_for(
                f"document.body && document.body.innerText.includes({site.study!r})",
                30,
                "the study list",
            )
            page.send("Page.navigate", {"url": f"{base}/studies/{site.study}"})
            size = page.wait_for(
                "(() => { const i = document.querySelector('img[src*=\"preview.png\"]');"
                " return i && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight]"
                " : null; })()",
                30,
                "the preview image",
            )
            assert size[0] > 0 and size[1] > 0
            page.screenshot(artifacts / "status-page-basic-auth.png")
        finally:
            if answerer is not None:
                answerer.close()
            pipe.close()
            site.server.stop()
