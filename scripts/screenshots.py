"""Screenshots of every dashboard page in headless Chromium (run through scripts/screenshots.sh).

Starts ``clearsight dashboard`` on loopback, drives Debian's ``chromium`` over the DevTools protocol
(shared/reference/serving.md section 5.3: a plain ``--screenshot`` captures only Streamlit's skeleton, so
this waits for real elements), runs Compare for real (clicks Run and waits for both heatmaps), and writes
one PNG per page. Fails (exit 1) when a page stays blank, shows an error or an exception, or Chromium is
missing. Installs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
PAGES = [("evals", "evals"), ("jobs", "jobs"), ("compare", "")]  # Jobs adds a folder: Evals first
RUNNING_JS = ("Array.from(document.querySelectorAll('[data-testid=stStatusWidget], header button'))"
              ".some(e => (e.innerText || '').trim() === 'Stop')")
ERRORS_JS = ("document.querySelectorAll('[data-testid=stException], [data-testid=stAlertContentError]').length")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: {proc.args[0]} exited with status {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"error: {url} did not answer within {timeout:.0f} s")


class Page:
    """One DevTools page session (just enough of the protocol: send a command, wait for its answer)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.n = ws, 0

    async def send(self, method: str, **params):
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def eval(self, js: str):
        r = await self.send("Runtime.evaluate", expression=js, returnByValue=True)
        return r.get("result", {}).get("value")

    async def wait_for(self, js: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.eval(js):
                return
            if await self.eval(ERRORS_JS):
                text = await self.eval("Array.from(document.querySelectorAll('[data-testid=stException], "
                                       "[data-testid=stAlertContentError]')).map(e => e.innerText).join(' | ')")
                raise SystemExit(f"error: the page shows an error while waiting for {what}: {text[:500]}")
            await asyncio.sleep(0.3)
        raise SystemExit(f"error: {what} did not appear within {timeout:.0f} s (blank page?)")

    async def settle(self, timeout: float = 60.0) -> None:
        """Wait until the script is not running (Streamlit's Stop button gone), then for the last paint."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and await self.eval(RUNNING_JS):
            await asyncio.sleep(0.3)
        await asyncio.sleep(2.0)

    async def screenshot(self, path: Path, width: int = 1400) -> None:
        height = int(await self.eval("Math.max(document.body.scrollHeight, "
                                     "(document.querySelector('[data-testid=stMain]') || document.body).scrollHeight)")
                     or 1000)
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=min(max(height, 800), 4000),
                        deviceScaleFactor=1, mobile=False)
        await asyncio.sleep(1.0)  # let the layout settle at the new size
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))


async def capture(devtools_port: int, base: str, out: Path, timeout: float) -> list[Path]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{devtools_port}/json/list") as r:
            targets = [t for t in await r.json() if t.get("type") == "page"]
        async with http.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.send("Page.enable")
            await page.send("Runtime.enable")
            await page.send("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1,
                            mobile=False)
            written = []
            for name, path in PAGES:
                await page.send("Page.navigate", url=f"{base}/{path}")
                await page.wait_for("document.querySelector('[data-testid=stHeading]') !== null", timeout,
                                    f"the {name} page's title")
                if name == "compare":
                    await page.wait_for("Array.from(document.querySelectorAll('[data-testid=stButton] button'))"
                                        ".some(b => b.innerText.trim() === 'Run' && !b.disabled)", timeout,
                                        "the Run button")
                    await page.eval("Array.from(document.querySelectorAll('[data-testid=stButton] button'))"
                                    ".find(b => b.innerText.trim() === 'Run').click()")
                    await page.wait_for("Array.from(document.querySelectorAll('[data-testid=stImage] img, "
                                        "[data-testid=stImageContainer] img')).length >= 3", timeout,
                                        "the two heatmaps")
                elif name == "jobs":  # start the form's job (2 systems, POPE 20 per split) and wait for it
                    await page.wait_for("Array.from(document.querySelectorAll('button'))"
                                        ".some(b => b.innerText.trim() === 'Start')", timeout, "the Start button")
                    await page.eval("Array.from(document.querySelectorAll('button'))"
                                    ".find(b => b.innerText.trim() === 'Start').click()")
                    await page.wait_for("document.body.innerText.includes('(local): done')", 4 * timeout,
                                        "the job finished")
                elif name == "evals":
                    await page.wait_for("document.querySelectorAll('[data-testid=stDataFrame]').length >= 1 || "
                                        "document.querySelector('[data-testid=stAlertContentInfo]') !== null",
                                        timeout, "the metric tables")
                await page.settle()
                if await page.eval(ERRORS_JS):
                    raise SystemExit(f"error: the {name} page shows an error")
                target = out / f"dashboard-{name}.png"
                await page.screenshot(target)
                written.append(target)
                print(f"{name}: {target}", file=sys.stderr)
            return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder for the PNGs (default: docs/)")
    ap.add_argument("--runs", default=None, help="result folders for the Evals page (default: a tiny job is run)")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium")
                    or shutil.which("chromium-browser"))
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each page")
    args = ap.parse_args()
    if not args.chromium:
        print("error: no chromium found: install Debian's (apt-get install chromium) or set $CHROMIUM", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="clearsight-shots-"))
    procs: list[subprocess.Popen] = []
    try:
        runs = Path(args.runs) if args.runs else tmp / "runs"
        if not args.runs:  # a small result folder, so the Evals page has something to show
            job = {"systems": [{"name": "none"}, {"name": "vcd", "mitigations": ["vcd"]}],
                   "benchmarks": [{"kind": "pope", "data": "builtin:shapes", "limit": 10},
                                  {"kind": "chair", "data": "builtin:shapes", "n_images": 5, "max_new_tokens": 40}],
                   "output": str(runs / "example")}
            (tmp / "job.json").write_text(json.dumps(job))
            subprocess.run([sys.executable, "-m", "clearsight", "eval", "run", str(tmp / "job.json"), "--no-progress"],
                           check=True, stdout=subprocess.DEVNULL)
        port, devtools = free_port(), free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "clearsight", "dashboard", "--port", str(port),
                                       "--runs", str(runs)], start_new_session=True))
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", 120, procs[-1])
        procs.append(subprocess.Popen([
            args.chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp / 'chromium'}", "--remote-debugging-address=127.0.0.1",
            f"--remote-debugging-port={devtools}", "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        wait_http(f"http://127.0.0.1:{devtools}/json/version", 60, procs[-1])
        asyncio.run(capture(devtools, f"http://127.0.0.1:{port}", out, args.timeout))
        return 0
    finally:
        for p in reversed(procs):  # each by its own process group, started here
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
