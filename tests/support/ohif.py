"""Open a study in the real OHIF viewer (headless Chromium) and read what it draws.

:func:`check_sr_in_ohif` serves the prebuilt OHIF 3.13 viewer (npm
``@ohif/app``, unpacked by ``tests/support/install-viewer.sh``) next to a real
Orthanc with DICOMweb, opens the study in Debian's Chromium, double-clicks the
SR thumbnail and returns the polylines of the SVG annotation layer, the
viewport rectangle, the image-to-canvas mapping, a PNG screenshot and, after
answering *Yes* to "continue tracking", the number of tracked rectangles.

Chromium is driven over the DevTools protocol through
``--remote-debugging-pipe``: commands go to the browser's fd 3 and answers
come from its fd 4, as NUL-terminated JSON messages, so no websocket library
is needed.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.errors import ViewerError, ViewerTimeoutError
from tests.support.ohif_server import OhifServer
from tests.support.orthanc import OrthancServer

logger = logging.getLogger(__name__)

OHIF_VERSION = "3.13.2"
OHIF_PACKAGE = f"@ohif/app@{OHIF_VERSION}"
CHROMIUM = "/usr/bin/chromium"
WINDOW_WIDTH, WINDOW_HEIGHT = 1600, 1000
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    f"--window-size={WINDOW_WIDTH},{WINDOW_HEIGHT}",
    "--remote-debugging-pipe",
)
PAGE_SETUP_SCRIPT = (
    # The onboarding tour's overlay swallows clicks; mark it as shown.
    "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"
    # The "investigational use" banner covers the bottom of the viewport.
    "sessionStorage.setItem('investigationalUseDialog', 'hidden');"
)
POLL_INTERVAL = 0.2


# -- locating the viewer and the browser ---------------------------------------


def cache_dir() -> Path:
    """Return the test download cache (env ``D2R_TEST_CACHE``, default ``~/.cache/d2r-test``)."""
    return Path(os.environ.get("D2R_TEST_CACHE", Path.home() / ".cache" / "d2r-test"))


def ohif_tarball(cache: Path | None = None) -> Path:
    """Return where ``npm pack`` leaves the OHIF tarball."""
    return (cache or cache_dir()) / "ohif" / f"ohif-app-{OHIF_VERSION}.tgz"


def ohif_dist(cache: Path | None = None) -> Path | None:
    """Return the unpacked OHIF ``dist/`` directory, unpacking the tarball if needed.

    Returns None when neither the directory nor the tarball exists.
    """
    base = (cache or cache_dir()) / "ohif"
    dist = base / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    tarball = ohif_tarball(cache)
    if not tarball.is_file():
        return None
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
        tar.extractall(base, members=members, filter="data")
    return dist if (dist / "index.html").is_file() else None


def find_chromium() -> Path | None:
    """Return Debian's Chromium launcher, or None where it is not installed."""
    if Path(CHROMIUM).is_file():
        return Path(CHROMIUM)
    found = shutil.which("chromium")
    return Path(found) if found else None


def artifacts_dir() -> Path:
    """Return the directory for test artifacts (env ``D2R_TEST_ARTIFACTS``).

    Defaults to ``<repository>/test-artifacts``.
    """
    default = Path(__file__).resolve().parents[2] / "test-artifacts"
    return Path(os.environ.get("D2R_TEST_ARTIFACTS", default))


# -- DevTools protocol over a pipe -------------------------------------------------


_FD_TRAMPOLINE = """
import os, sys
read_fd, write_fd = int(sys.argv[1]), int(sys.argv[2])
os.dup2(read_fd, 3)
os.dup2(write_fd, 4)
os.close(read_fd)
os.close(write_fd)
os.execv(sys.argv[3], sys.argv[3:])
"""
"""Moves the DevTools pipe ends onto fds 3 and 4, then execs the browser."""


def _pipe_above_4() -> tuple[int, int]:
    """Return a pipe whose ends are not fds 3 or 4, so the launcher can move them there."""
    ends = []
    for fd in os.pipe():
        ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(fd)
    return ends[0], ends[1]


class DevToolsPipe:
    """A Chromium process and its DevTools connection over fds 3 and 4.

    Parameters
    ----------
    chromium
        The browser binary or launcher.
    profile_dir
        Empty directory for ``--user-data-dir``.
    log_path
        File that receives the browser's stdout and stderr.
    """

    def __init__(self, chromium: Path, profile_dir: Path, log_path: Path) -> None:
        to_browser_r, self._to_browser = _pipe_above_4()
        self._from_browser, from_browser_w = _pipe_above_4()
        argv = [str(chromium), *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "about:blank"]
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _FD_TRAMPOLINE,
                    str(to_browser_r),
                    str(from_browser_w),
                    *argv,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(to_browser_r, from_browser_w),
                start_new_session=True,
            )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._lock = threading.Lock()
        self._answers: dict[int, dict[str, Any]] = {}
        self._answered = threading.Condition()
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name="cdp-reader", daemon=True)
        self._reader.start()

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(message)`` for every event the browser sends."""
        self._listeners.append(listener)

    def _read_loop(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._answered:
                        self._answers[message["id"]] = message
                        self._answered.notify_all()
                else:
                    for listener in self._listeners:
                        listener(message)
        with self._answered:
            self._closed = True
            self._answered.notify_all()

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float = 30,
    ) -> dict[str, Any]:
        """Send one command and return its ``result``.

        Raises
        ------
        ViewerError
            If the browser answers with an error or has gone away.
        ViewerTimeoutError
            If no answer comes within ``timeout`` seconds.
        """
        with self._lock:
            self._next_id += 1
            message_id = self._next_id
            message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
            if session_id:
                message["sessionId"] = session_id
            try:
                os.write(self._to_browser, json.dumps(message).encode() + b"\0")
            except OSError as e:
                raise ViewerError(f"Chromium pipe closed while sending {method}") from e
        deadline = time.monotonic() + timeout
        with self._answered:
            while message_id not in self._answers:
                remaining = deadline - time.monotonic()
                if self._closed:
                    raise ViewerError(f"Chromium exited before answering {method}")
                if remaining <= 0:
                    raise ViewerTimeoutError(f"no answer to {method} within {timeout} s")
                self._answered.wait(remaining)
            answer = self._answers.pop(message_id)
        if "error" in answer:
            raise ViewerError(f"{method} failed: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    def close(self, timeout: float = 10) -> None:
        """Ask the browser to quit, then kill its process group if it lingers."""
        with contextlib.suppress(ViewerError):
            self.send("Browser.close", timeout=3)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 9)
            self.process.wait(timeout)
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._reader.join(5)


class Page:
    """One browser tab attached through a flat DevTools session."""

    def __init__(self, pipe: DevToolsPipe) -> None:
        self.pipe = pipe
        self.console_errors: list[str] = []
        self.session_id = ""
        pipe.add_listener(self._on_event)
        target = pipe.send("Target.createTarget", {"url": "about:blank"})
        attached = pipe.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        self.session_id = attached["sessionId"]

    def _on_event(self, message: dict[str, Any]) -> None:
        if message.get("sessionId") != self.session_id:
            return
        method = message.get("method")
        params = message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            texts = [
                str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])
            ]
            self.console_errors.append(" ".join(texts)[:500])
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exception = details.get("exception", {})
            self.console_errors.append(
                str(exception.get("description", details.get("text", "")))[:500]
            )
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.console_errors.append(f"{entry.get('text', '')} {entry.get('url', '')}"[:500])

    def send(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        """Send a command to this tab."""
        return self.pipe.send(method, params, session_id=self.session_id, timeout=timeout)

    def evaluate(self, expression: str, timeout: float = 30) -> Any:
        """Evaluate a JavaScript expression in the page and return its JSON value."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description", details.get("text"))
            raise ViewerError(f"page script failed: {text}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Poll a JavaScript expression until it is truthy and return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise ViewerTimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(POLL_INTERVAL)

    def click(self, x: float, y: float, count: int = 1) -> None:
        """Press and release the left mouse button ``count`` times at (x, y)."""
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for n in range(1, count + 1):
            for kind in ("mousePressed", "mouseReleased"):
                self.send(
                    "Input.dispatchMouseEvent",
                    {"type": kind, "x": x, "y": y, "button": "left", "clickCount": n},
                )

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the visible page."""
        data = self.send("Page.captureScreenshot", {"format": "png"}, timeout=60)["data"]
        path.write_bytes(base64.b64decode(data))
        return path


# -- page scripts ------------------------------------------------------------------

JS_IMAGE_SHOWN = """(() => {
  const s = window.services;
  if (!s || !s.cornerstoneViewportService) return false;
  const cvs = s.cornerstoneViewportService;
  for (const id of cvs.getViewportIds()) {
    const vp = cvs.getCornerstoneViewport(id);
    if (vp && vp.getImageData && vp.getImageData()) return true;
  }
  return false;
})()"""

JS_SR_THUMBNAIL = """((seriesNumber) => {
  const items = [...document.querySelectorAll('[data-series]')]
    .filter(e => String(e.getAttribute('data-series')) === String(seriesNumber));
  for (const el of items) {
    el.scrollIntoView({block: 'center'});
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.height > 0) return [r.x + r.width / 2, r.y + r.height / 2];
  }
  return null;
})(%d)"""

JS_SR_SHOWN = """(() => {
  const s = window.services;
  if (!s) return null;
  const state = s.viewportGridService.getState();
  const viewports = state.viewports instanceof Map ? [...state.viewports.values()]
                                                   : Object.values(state.viewports || {});
  for (const vp of viewports) {
    for (const uid of (vp.displaySetInstanceUIDs || [])) {
      const ds = s.displaySetService.getDisplaySetByUID(uid);
      if (ds && ds.Modality === 'SR' && ds.isLoaded) {
        return {viewportId: vp.viewportId, displaySet: uid};
      }
    }
  }
  return null;
})()"""

JS_POLYLINES = """(() => {
  const layer = [...document.querySelectorAll('.svg-layer')]
    .find(l => l.querySelector('polyline')) || document.querySelector('.svg-layer');
  if (!layer) return null;
  const r = layer.getBoundingClientRect();
  const polylines = [...layer.querySelectorAll('polyline')].map(p => {
    const nums = (p.getAttribute('points') || '').trim().split(/[\\s,]+/).map(Number);
    const pts = [];
    for (let i = 0; i + 1 < nums.length; i += 2) pts.push([nums[i], nums[i + 1]]);
    return pts.map(([x, y]) => [Number.isFinite(x) ? x : null, Number.isFinite(y) ? y : null]);
  });
  const labels = [...layer.querySelectorAll('text')].map(t => {
    const spans = [...t.querySelectorAll('tspan')].map(x => x.textContent.trim());
    return spans.length ? spans.filter(x => x) : [t.textContent.trim()];
  }).filter(lines => lines.length && lines.some(x => x));
  return {polylines, labels, viewport: [r.x, r.y, r.width, r.height]};
})()"""

JS_SR_STATE = """(() => {
  const out = {svg_layers: document.querySelectorAll('.svg-layer').length};
  try {
    out.annotations = window.cornerstoneTools.annotation.state.getAllAnnotations()
      .map(a => a.metadata && a.metadata.toolName);
  } catch (e) { out.annotations = String(e); }
  try {
    out.viewports = window.cornerstone.getRenderingEngines().flatMap(e => e.getViewports())
      .map(v => ({id: v.id, type: v.type, has_image: !!(v.getImageData && v.getImageData()),
                  image: v.getCurrentImageId ? String(v.getCurrentImageId()).slice(-40) : null}));
  } catch (e) { out.viewports = String(e); }
  return out;
})()"""

JS_RENDER_ALL = """(() => {
  for (const engine of window.cornerstone.getRenderingEngines()) engine.render();
  return true;
})()"""

JS_IMAGE_TO_CANVAS = """((viewportId) => {
  const cvs = window.services.cornerstoneViewportService;
  const ids = viewportId ? [viewportId] : cvs.getViewportIds();
  for (const id of ids) {
    const vp = cvs.getCornerstoneViewport(id);
    const data = vp && vp.getImageData && vp.getImageData();
    if (!data || !data.imageData) continue;
    const toCanvas = (i, j) => vp.worldToCanvas(data.imageData.indexToWorld([i, j, 0]));
    const o = toCanvas(0, 0), x = toCanvas(1000, 0), y = toCanvas(0, 1000);
    const dims = data.dimensions;
    return {scale_x: (x[0] - o[0]) / 1000, scale_y: (y[1] - o[1]) / 1000,
            offset_x: o[0], offset_y: o[1], columns: dims[0], rows: dims[1]};
  }
  return null;
})(%s)"""

JS_YES_BUTTON = """(() => {
  const b = [...document.querySelectorAll('button')]
    .find(e => e.textContent.trim() === 'Yes' && e.getBoundingClientRect().width > 0);
  if (!b) return null;
  const r = b.getBoundingClientRect();
  return [r.x + r.width / 2, r.y + r.height / 2];
})()"""

JS_RECTANGLES = """(() => {
  const s = window.services;
  if (!s || !s.measurementService) return 0;
  return s.measurementService.getMeasurements().filter(m => m.toolName === 'RectangleROI').length;
})()"""


# -- the check -----------------------------------------------------------------------


@dataclass
class ImageToCanvas:
    """Affine map from image pixels (column, row) to SVG/canvas pixels, as the page reports it."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    columns: int
    rows: int

    def __call__(self, column: float, row: float) -> tuple[float, float]:
        """Map one image point to canvas coordinates."""
        return self.offset_x + self.scale_x * column, self.offset_y + self.scale_y * row


@dataclass
class ViewerResult:
    """What the viewer drew for the SR.

    Attributes
    ----------
    polylines
        Every ``<polyline>`` of the SVG annotation layer, as (x, y) points in
        the layer's own (canvas CSS pixel) coordinates; ``nan`` where the page
        had a non-finite value.
    viewport
        The SVG layer's rectangle in the page: (left, top, width, height).
    screenshot
        PNG of the page with the SR displayed (before hydration).
    hydrated_rectangles
        Tracked ``RectangleROI`` measurements after answering *Yes* to
        "continue tracking"; None when hydration was not requested or no
        prompt appeared.
    console_errors
        Errors the page logged (console, exceptions, failed requests).
    image_to_canvas
        The image-to-canvas mapping read from the cornerstone viewport, if any.
    labels
        The text boxes the overlay drew next to the boxes (one list of lines per text box),
        read from the SVG layer's ``<text>`` elements when the polylines were read.
    timings
        Seconds per step, for reports.
    notes
        What had to be done to get the SR drawn, with the page's annotation and viewport
        state before each step; empty when OHIF drew it at once.
    """

    polylines: list[list[tuple[float, float]]]
    viewport: tuple[float, float, float, float]
    screenshot: Path
    hydrated_rectangles: int | None
    console_errors: list[str]
    image_to_canvas: ImageToCanvas | None = None
    labels: list[list[str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _finite(value: Any) -> float:
    return float(value) if value is not None else math.nan


def _wait_stable_polylines(page: Page, timeout: float) -> dict[str, Any]:
    """Wait until the SVG layer has polylines and their count stops changing."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    stable_since = time.monotonic()
    while True:
        snapshot = page.evaluate(JS_POLYLINES) or {"polylines": [], "viewport": [0, 0, 0, 0]}
        count = len(snapshot["polylines"])
        if last is None or count != len(last["polylines"]):
            stable_since = time.monotonic()
        last = snapshot
        now = time.monotonic()
        if count and now - stable_since >= 1.0:
            return last
        if now > deadline:
            return last
        time.sleep(POLL_INTERVAL)


def _wait_sr_drawn(page: Page, timeout: float, notes: list[str]) -> dict[str, Any]:
    """Wait for the SR's polylines; if none come, do what a reader does, then look again.

    OHIF draws SR annotations when the viewport renders. Should the SR's annotations reach
    the tool state after the viewport's last render, nothing is drawn until the next one,
    which a reader triggers by moving the mouse over the image. So, after a first wait
    without polylines, the pointer moves over the viewport and, failing that, every
    viewport is rendered once more. Each step, and the page's annotation and viewport state
    before it, goes to ``notes``: a test shows them when the boxes are missing, and a nudge
    that was needed is logged.
    """
    deadline = time.monotonic() + timeout
    snapshot = _wait_stable_polylines(page, min(8.0, timeout))
    nudges: list[tuple[str, Callable[[], Any]]] = [
        ("moved the pointer over the viewport", lambda: _hover_viewport(page)),
        ("rendered every viewport again", lambda: page.evaluate(JS_RENDER_ALL)),
    ]
    for what, nudge in nudges:
        if snapshot["polylines"]:
            break
        notes.append(f"no polylines yet; page state {json.dumps(page.evaluate(JS_SR_STATE))}")
        nudge()
        notes.append(what)
        logger.warning("OHIF drew no SR polylines in time; %s", what)
        snapshot = _wait_stable_polylines(page, max(1.0, min(4.0, deadline - time.monotonic())))
    if not snapshot["polylines"]:
        notes.append(f"still no polylines; page state {json.dumps(page.evaluate(JS_SR_STATE))}")
    return snapshot


def _hover_viewport(page: Page) -> None:
    layer = page.evaluate(JS_POLYLINES)
    if layer and layer["viewport"][2] > 0:
        x, y, width, height = layer["viewport"]
        for dx in (0.45, 0.55):
            page.send(
                "Input.dispatchMouseEvent",
                {"type": "mouseMoved", "x": x + dx * width, "y": y + height / 2},
            )


def check_sr_in_ohif(
    orthanc: OrthancServer,
    study_uid: str,
    sr_series_number: int,
    artifacts: Path,
    *,
    hydrate: bool = True,
    timeout: float = 60,
    hydration_timeout: float = 10,
    name: str = "ohif-sr",
) -> ViewerResult:
    """Open a study in OHIF, display its SR and report the boxes drawn.

    Parameters
    ----------
    orthanc
        A running Orthanc with the DICOMweb plugin that holds the study.
    study_uid
        Study Instance UID to open.
    sr_series_number
        Series Number of the SR series (its thumbnail's ``data-series``).
    artifacts
        Directory for the screenshot and the browser log.
    hydrate
        Also answer *Yes* to "continue tracking" and count tracked rectangles.
    timeout
        Overall budget in seconds for the page to show image and SR.
    hydration_timeout
        Seconds to wait for the tracking prompt and then for tracked rectangles
        (hydration that works takes about a second).
    name
        Stem of the artifact file names.

    Raises
    ------
    ViewerError
        If the viewer build or Chromium is missing, or the page breaks.
    ViewerTimeoutError
        If no image or no SR thumbnail appears in time.
    """
    if not orthanc.dicomweb:
        raise ViewerError("the Orthanc server needs dicomweb=True")
    dist = ohif_dist()
    if dist is None:
        raise ViewerError(
            f"OHIF {OHIF_VERSION} not found under {cache_dir()}: "
            "run tests/support/install-viewer.sh"
        )
    chromium = find_chromium()
    if chromium is None:
        raise ViewerError("Chromium is not installed (Debian package 'chromium')")
    artifacts.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    notes: list[str] = []
    started = time.monotonic()
    deadline = started + timeout

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    with (
        tempfile.TemporaryDirectory(prefix="d2r-chromium-") as profile,
        OhifServer(dist, orthanc.http_port) as server,
    ):
        pipe = DevToolsPipe(chromium, Path(profile), artifacts / f"{name}-chromium.log")
        page: Page | None = None
        try:
            page = Page(pipe)
            for domain in ("Page", "Runtime", "Log"):
                page.send(f"{domain}.enable")
            page.send(
                "Emulation.setDeviceMetricsOverride",
                {
                    "width": WINDOW_WIDTH,
                    "height": WINDOW_HEIGHT,
                    "deviceScaleFactor": 1,
                    "mobile": False,
                },
            )
            page.send("Page.addScriptToEvaluateOnNewDocument", {"source": PAGE_SETUP_SCRIPT})
            timings["browser_start"] = time.monotonic() - started
            url = f"{server.base_url}/viewer?StudyInstanceUIDs={study_uid}"
            page.send("Page.navigate", {"url": url})
            page.wait_for(JS_IMAGE_SHOWN, left(), "an image in a viewport")
            timings["first_image"] = time.monotonic() - started
            point = page.wait_for(
                JS_SR_THUMBNAIL % sr_series_number, left(), f"SR thumbnail {sr_series_number}"
            )
            page.click(point[0], point[1], count=2)
            clicked = time.monotonic()
            shown = page.wait_for(JS_SR_SHOWN, left(), "the SR display set in a viewport")
            snapshot = _wait_sr_drawn(page, min(left(), 20.0), notes)
            timings["sr_drawn"] = time.monotonic() - clicked
            polylines = [
                [(_finite(x), _finite(y)) for x, y in line] for line in snapshot["polylines"]
            ]
            viewport = tuple(float(v) for v in snapshot["viewport"])
            labels = [[str(line) for line in box] for box in snapshot.get("labels") or []]
            transform = page.evaluate(JS_IMAGE_TO_CANVAS % json.dumps(shown["viewportId"]))
            image_to_canvas = ImageToCanvas(**transform) if transform else None
            screenshot = page.screenshot(artifacts / f"{name}.png")
            hydrated: int | None = None
            if hydrate:
                hydrate_start = time.monotonic()
                try:
                    yes = page.wait_for(JS_YES_BUTTON, hydration_timeout, "the tracking prompt")
                except ViewerTimeoutError:
                    # OHIF offers tracking only for SRs it can turn into tools.
                    logger.info("no tracking prompt for study %s", study_uid)
                else:
                    page.click(yes[0], yes[1])
                    try:
                        hydrated = int(
                            page.wait_for(JS_RECTANGLES, hydration_timeout, "tracked rectangles")
                        )
                    except ViewerTimeoutError:
                        hydrated = 0
                    page.screenshot(artifacts / f"{name}-hydrated.png")
                timings["hydration"] = time.monotonic() - hydrate_start
            timings["total"] = time.monotonic() - started
            errors = list(page.console_errors)
        except ViewerError:
            if page is not None:
                with contextlib.suppress(ViewerError):
                    page.screenshot(artifacts / f"{name}-failure.png")
                (artifacts / f"{name}-console.txt").write_text("\n".join(page.console_errors))
            raise
        finally:
            pipe.close()
    (artifacts / f"{name}-console.txt").write_text("\n".join(errors))
    (artifacts / f"{name}-notes.txt").write_text("\n".join(notes))
    logger.info("OHIF check of study %s took %.1f s", study_uid, timings["total"])
    return ViewerResult(
        polylines=polylines,
        viewport=(viewport[0], viewport[1], viewport[2], viewport[3]),
        screenshot=screenshot,
        hydrated_rectangles=hydrated,
        console_errors=errors,
        image_to_canvas=image_to_canvas,
        labels=labels,
        timings=timings,
        notes=notes,
    )
