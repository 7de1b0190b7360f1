"""Helpers for the dashboard tests: a uvicorn server in a thread on a free
127.0.0.1 port, and a headless system Chromium driven by Selenium."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time

CHROMIUM = os.environ.get("ONPOLICY_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ONPOLICY_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-default-apps", "--disable-extensions", "--hide-scrollbars",
                  "--force-device-scale-factor=1", "--disable-dev-shm-usage"]


class ServerThread:
    """Serve an ASGI app with uvicorn on 127.0.0.1:<port> (default: a free one) in a daemon thread."""

    def __init__(self, app, port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def browser_available() -> str | None:
    """None if a headless browser can be driven here, else why not."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    for p in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(p) and os.access(p, os.X_OK)):
            return f"{p} not found (apt-get install chromium chromium-driver)"
    return None


class Chromium:
    """A headless Chromium with a fresh profile, driven through chromedriver."""

    def __init__(self, width=1440, height=1000):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="onpolicy-chromium-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for f in CHROMIUM_FLAGS + [f"--user-data-dir={self.profile}", f"--window-size={width},{height}"]:
            opts.add_argument(f)
        opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        self.driver.set_page_load_timeout(30)
        self.driver.set_script_timeout(30)

    def wait_for(self, js: str, timeout: float = 15.0, poll: float = 0.02):
        """Poll a JS expression until it is truthy (bounded); return its value."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.driver.execute_script("return " + js)
            if v:
                return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for: {js}")
            time.sleep(poll)

    def requested_urls(self) -> list[str]:
        """Every URL the page requested (from the performance log) since last call."""
        import json

        urls = []
        for entry in self.driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg.get("method") == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
        return urls

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]

    def screenshot_full(self, path, width=1440):
        h = self.driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
        self.driver.set_window_size(width, h)
        self.driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.3)
        self.driver.save_screenshot(str(path))

    def close(self):
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
