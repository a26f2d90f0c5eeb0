"""What the browser tests stand on: Debian's chromium (skipped only where it is absent), a notebook server on
127.0.0.1 with a token in SMOKE MODE that stops when the tests end, and a page that runs cells as a person does.

The front end is whichever this environment has: JupyterLab 4 (with ipywidgets 8: the main CI job), else the classic
Notebook 6.5 (with ipywidgets 7.7.1: the Colab-stack job; Colab's own front end is the nearest to it). The tests are
the same on both; only the page's selectors differ (FRONTENDS)."""
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Frontend:
    name: str
    command: tuple          # `python -m jupyter ...`
    url: str                # the notebook's page, from the server's base ({ws}: a workspace of its own)
    cell: str
    editor: str
    prompt: str
    output: str
    kernel_idle: str        # a selector or text seen once the kernel is ready
    # console errors of the front end itself that do not change what renders: checked, not hidden (see FRONTENDS)
    known_noise: tuple = ()


FRONTENDS = {
    "lab": Frontend("JupyterLab", ("lab",), "/lab/workspaces/{ws}/tree/{name}?reset", ".jp-Notebook .jp-Cell",
                    ".jp-InputArea-editor", ".jp-InputPrompt", ".jp-OutputArea-output",
                    "text=Python 3 (ipykernel) | Idle"),
    "notebook": Frontend("Notebook", ("notebook",), "/notebooks/{name}", "#notebook-container .cell",
                         ".input_area", ".input_prompt", ".output_area", "#kernel_indicator_icon.kernel_idle_icon",
                         # widgetsnbextension 3.6 logs this once for every widget shown inside an Output widget
                         # (a progress bar in a panel) and renders it all the same; seen with 3.6.6 on Notebook 6.5.7
                         # (the tests check that the bar is there)
                         known_noise=("Host is not attached.",)),
}


def _version(name: str):
    try:
        return tuple(int(p) for p in re.findall(r"\d+", importlib.metadata.version(name))[:2])
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_frontend() -> str | None:
    """"lab" where JupyterLab is installed, else "notebook" where the classic Notebook (< 7) is, else None."""
    if _version("jupyterlab"):
        return "lab"
    notebook = _version("notebook")
    return "notebook" if notebook and notebook < (7, 0) else None


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="session")
def chromium():
    """Playwright's chromium driving Debian's build (no `playwright install`: nothing downloads a browser)."""
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium here: apt-get install -y chromium (Debian's package) to run the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    frontend: Frontend
    base: str
    token: str
    root: Path


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The installed front end's server (root: a fresh folder) on 127.0.0.1, in SMOKE MODE."""
    kind = installed_frontend()
    if kind is None:
        pytest.fail("neither JupyterLab nor the classic Notebook (< 7) is installed: pip install -e '.[test]'")
    frontend = FRONTENDS[kind]
    root = tmp_path_factory.mktemp("notebooks")
    home = tmp_path_factory.mktemp("jupyter")
    (home / "config" / "labconfig").mkdir(parents=True)
    # no "news" prompt over the page (a notification, not part of what is tested)
    (home / "config" / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "HELPERS_TINY": "1", "HF_HUB_OFFLINE": "1", "HELPERS_HOME": str(home / "helpers"),
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTER_DATA_DIR": str(home / "data"), "IPYTHONDIR": str(home / "ipython")}
    token_flag = "--IdentityProvider.token" if kind == "lab" else "--NotebookApp.token"
    root_flag = "--ServerApp.root_dir" if kind == "lab" else "--NotebookApp.notebook_dir"
    log = open(home / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyter", *frontend.command, "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"{token_flag}={token}", f"{root_flag}={root}", "--allow-root"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{frontend.name} did not start:\n" + (home / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield Server(frontend, base, token, root)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


@pytest.fixture
def screenshots(request) -> Path:
    """Where screenshots go: $BROWSER_SCREENSHOTS, else the test's temporary folder."""
    folder = Path(os.environ.get("BROWSER_SCREENSHOTS") or request.getfixturevalue("tmp_path"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class NotebookPage:
    """A notebook of `cells` opened in the front end; cells run as a person runs them (click, Shift+Enter)."""

    def __init__(self, browser, server: Server, name: str, cells: list[str], shots: Path):
        import nbformat

        self.server, self.frontend, self.name, self.shots = server, server.frontend, name, shots
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, server.root / f"{name}.ipynb")
        self.page = browser.new_page(viewport={"width": 1280, "height": 1000})
        self.errors = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        # a fresh workspace each: Lab would otherwise restore the earlier tests' tabs and open this one behind them
        url = self.frontend.url.format(name=f"{name}.ipynb", ws=name)
        self.page.goto(f"{server.base}{url}{'&' if '?' in url else '?'}token={server.token}")
        try:
            self.cell(0).wait_for(timeout=60_000)
            self.page.locator(self.frontend.kernel_idle).first.wait_for(state="attached", timeout=60_000)
        except Exception:
            self.close()   # its screenshot shows where the page stood
            raise

    def cell(self, index: int):
        return self.page.locator(self.frontend.cell).nth(index)

    def run(self, index: int, timeout_s: float = 120) -> None:
        """Run cell `index` and wait until it has run (its prompt shows a number)."""
        from playwright.sync_api import expect

        cell = self.cell(index)
        cell.locator(self.frontend.editor).click()
        self.page.keyboard.press("Shift+Enter")
        expect(cell.locator(self.frontend.prompt)).to_have_text(re.compile(r"\[\d+\]"), timeout=timeout_s * 1000)
        outputs = cell.locator(self.frontend.output)
        for i in range(outputs.count()):   # a cell that failed stops the test here, with its traceback
            text = outputs.nth(i).inner_text()
            assert "Traceback (most recent call last)" not in text, f"cell {index} failed:\n{text[-3000:]}"

    def output(self, index: int):
        """The first output of cell `index` (a panel is its cell's only output)."""
        return self.cell(index).locator(self.frontend.output).first

    def printed(self, index: int, pattern: str) -> re.Match:
        """Run cell `index`, which prints a line; the match of `pattern` in what it printed."""
        self.run(index)
        out = self.output(index)
        out.wait_for(timeout=30_000)
        found = re.search(pattern, out.inner_text())
        assert found, out.inner_text()
        return found

    def shot(self, what: str) -> None:
        self.page.screenshot(path=str(self.shots / f"{self.name}_{what}.png"), full_page=True)

    def assert_clean(self) -> None:
        """No widget failed to render, nothing went wrong in the page's console."""
        assert self.page.get_by_text("Error displaying widget").count() == 0
        errors = [e for e in self.errors if e not in self.frontend.known_noise]
        assert errors == [], errors

    def close(self) -> None:
        self.shot("last")   # where it stood, also on a failure
        print(f"{self.frontend.name} console errors:", self.errors)
        self.page.close()
        self._shut_down_kernels()

    def _shut_down_kernels(self) -> None:
        """The notebook's kernel goes with its page (the next test starts from a server with no session open)."""
        api = f"{self.server.base}/api/sessions"
        headers = {"Authorization": f"token {self.server.token}"}
        with urllib.request.urlopen(urllib.request.Request(api, headers=headers), timeout=10) as r:
            sessions = json.load(r)
        for session in sessions:
            request = urllib.request.Request(f"{api}/{session['id']}", headers=headers, method="DELETE")
            urllib.request.urlopen(request, timeout=30).close()


@pytest.fixture
def notebook(chromium, server, screenshots):
    """Open a notebook: notebook(name, cells) -> NotebookPage; closed (with a last screenshot) after the test."""
    pages = []

    def open_notebook(name: str, cells: list[str]) -> NotebookPage:
        prefix = "lab" if server.frontend.name == "JupyterLab" else "nb65"
        pages.append(NotebookPage(chromium, server, f"{prefix}_{name}", cells, screenshots))
        return pages[-1]

    yield open_notebook
    for page in pages:
        page.close()
