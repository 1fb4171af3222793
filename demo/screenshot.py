"""Drive the demo in headless Chromium: the README screenshot, and the helpers the browser tests use.

    python -m demo.screenshot --out docs/demo_screenshot.png [--checkpoint PATH] [--image PATH] [--prompt TEXT]
    python -m demo.screenshot --out docs/demo_refer_screenshot.png --refer 20,40,120,140     # Refer mode, a box

It starts `python -m demo.gradio_app` on a free loopback port, uploads the image (default: the first generated
example), presses Submit (in Refer mode after drawing the box by clicking its two corners on the image), waits for
the answer and saves a full-page screenshot. The browser is Debian's `chromium`
driven by Playwright (`pip install playwright`; Playwright's own browser download is not used). Every wait is bounded.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from urllib.parse import unquote
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SERVER_START_TIMEOUT = 180  # loading a checkpoint + importing gradio; the released model on CPU takes longer
PAGE_TIMEOUT_MS = 60_000


def find_chromium() -> str | None:
    """KOSMOS2_CHROMIUM, else a Chromium/Chrome binary on PATH."""
    explicit = os.environ.get("KOSMOS2_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def demo_server(checkpoint: Path, log_path: Path, extra_args: list[str] = (), timeout: float = SERVER_START_TIMEOUT):
    """Run the demo on 127.0.0.1:<free port> in a child process; yields its URL; stops it (by its pid) on exit."""
    port = free_port()
    command = [sys.executable, "-m", "demo.gradio_app", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
               "--port", str(port), *extra_args]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while not _answers(url):
            if process.poll() is not None:
                raise RuntimeError(f"the demo exited with status {process.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the demo did not answer on {url} within {timeout} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@contextmanager
def chromium_page(executable: str, width: int = 1280, height: int = 900):
    """A headless Chromium page (Playwright). --no-sandbox: Chromium refuses to sandbox when run as root."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"], timeout=PAGE_TIMEOUT_MS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def open_demo(page, url: str) -> None:
    page.goto(url, timeout=PAGE_TIMEOUT_MS)
    page.wait_for_selector("#submit")


_INPUT_SHOWS = """(name) => [...document.querySelectorAll('#input-image img')]
                   .some(img => decodeURIComponent(img.getAttribute('src') || '').endsWith('/' + name))"""


def upload(page, image: Path) -> None:
    page.locator("#input-image input[type=file]").set_input_files(str(image))
    # the upload is done when the preview shows the file gradio stored (its URL ends with the file's name; waiting
    # for any <img> would return at once when an earlier upload is still shown)
    page.wait_for_function(_INPUT_SHOWS, arg=Path(image).name)


def pick_example(page, index: int) -> str:
    """Click example image `index` (the gallery under the page) and wait until the input shows it; returns its name."""
    item = page.locator("button.gallery-item").nth(index)
    name = Path(unquote(item.locator("img").get_attribute("src"))).name
    item.click()
    page.wait_for_function(_INPUT_SHOWS, arg=name)
    return name


def set_prompt(page, text: str) -> None:
    box = page.locator("#prompt textarea")
    box.fill(text)
    box.dispatch_event("input")


def dismiss_errors(page) -> None:
    from playwright.sync_api import Error as PlaywrightError

    for close in page.locator("[data-testid=toast-close]").all():
        try:
            close.click(timeout=5_000)
        except PlaywrightError:  # the toast closed by itself (after 10 s) in the meantime
            pass
    page.wait_for_selector("[data-testid=toast-text]", state="detached")


# Set by a MutationObserver once the status line's progress tracker shows (request queued or running): the tracker
# is hidden again when the answer is in, and the page's status text alone cannot tell a new answer from an old one
# (the tracker's timer and progress text are part of it while the request runs).
_WATCH_STATUS = """() => {
    const block = document.querySelector('#status');
    window.__kosmos2_busy = false;
    window.__kosmos2_progress = [];
    window.__kosmos2_observer?.disconnect();
    window.__kosmos2_observer = new MutationObserver(() => {
        const tracker = block.querySelector('[data-testid=status-tracker]');
        if (tracker && !tracker.classList.contains('hide')) {
            window.__kosmos2_busy = true;
            const text = tracker.innerText.trim();
            if (text && window.__kosmos2_progress.at(-1) !== text) window.__kosmos2_progress.push(text);
        }
    });
    window.__kosmos2_observer.observe(block, {subtree: true, childList: true, attributes: true});
}"""
_ANSWERED = """() => {
    if (document.querySelector('[data-testid=toast-text]')) return true;
    const tracker = document.querySelector('#status [data-testid=status-tracker]');
    return window.__kosmos2_busy && tracker !== null && tracker.classList.contains('hide');
}"""


def status_text(page) -> str:
    return page.locator("#status [data-testid=markdown]").inner_text().strip()


def submit_and_wait(page, timeout_ms: int = PAGE_TIMEOUT_MS) -> str:
    """Press Submit and wait until this request's answer is in the page (or an error toast appears).
    Returns the status line, or the error text prefixed with 'error: '."""
    dismiss_errors(page)  # an earlier error toast would otherwise count as this request's answer
    page.evaluate(_WATCH_STATUS)
    page.click("#submit")
    page.wait_for_function(_ANSWERED, timeout=timeout_ms)
    toast = page.locator("[data-testid=toast-text]")
    if toast.count():
        return "error: " + toast.first.inner_text()
    return status_text(page)


def progress_seen(page) -> list[str]:
    """The texts the status line's progress tracker showed during the last `submit_and_wait` (queue position, timer,
    progress descriptions), in order."""
    return page.evaluate("() => window.__kosmos2_progress || []")


def highlighted_phrases(page) -> list[tuple[str, str]]:
    """(text, CSS background colour) of every highlighted phrase of the grounded text."""
    tokens = page.locator("#caption .token.highlighted")
    return [(tokens.nth(i).inner_text().strip(), tokens.nth(i).evaluate("e => getComputedStyle(e).backgroundColor"))
            for i in range(tokens.count())]


def set_mode(page, mode: str) -> None:
    """'Ground' or 'Refer' (the radio at the top of the input column)."""
    page.locator("#mode").get_by_label(mode, exact=True).check()
    target = "#refer-preview" if mode == "Refer" else "#prompt"
    page.wait_for_selector(target, state="visible")


def type_box(page, text: str) -> None:
    box = page.locator("#box textarea, #box input").first
    box.fill(text)
    box.dispatch_event("input")
    box.blur()  # the box's change event redraws the preview


_PREVIEW_SHOWS_BOX = """(expected) => {
    const box = document.querySelector('#box textarea, #box input');
    return box !== null && box.value === expected;
}"""


def click_corners(page, first: tuple[int, int], second: tuple[int, int]) -> str:
    """Click two corners (pixel coordinates of the uploaded image) on the Refer preview; returns the box text the page
    then shows. The page maps a click back to image pixels the way gradio does (image scaled to fit, centred, never
    enlarged), so the click position is computed the same way."""
    image = page.locator("#refer-preview img")
    image.wait_for(state="visible")
    page.wait_for_function("() => { const i = document.querySelector('#refer-preview img'); return i && i.complete "
                           "&& i.naturalWidth > 0; }")
    for x, y in (first, second):
        rect = image.evaluate("i => { const r = i.getBoundingClientRect(); return [r.left, r.top, r.width, r.height, "
                              "i.naturalWidth, i.naturalHeight]; }")
        left, top, width, height, natural_w, natural_h = rect
        scale = min(width / natural_w, height / natural_h, 1)
        offset_x, offset_y = (width - natural_w * scale) / 2, (height - natural_h * scale) / 2
        page.mouse.click(left + offset_x + (x + 0.5) * scale, top + offset_y + (y + 0.5) * scale)
        page.wait_for_timeout(300)  # the click's event round trip redraws the preview
    expected = f"{min(first[0], second[0])}, {min(first[1], second[1])}, {max(first[0], second[0])}, {max(first[1], second[1])}"
    page.wait_for_function(_PREVIEW_SHOWS_BOX, arg=expected)
    return expected


def show_raw_output(page) -> None:
    page.get_by_text("Raw output and entities").click()
    page.wait_for_selector("#raw textarea")


def main(argv=None) -> None:
    from demo.gradio_app import DEFAULT_CHECKPOINT, EXAMPLES_DIR, make_examples

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "demo_screenshot.png")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--image", type=Path, help="default: the first generated example image")
    parser.add_argument("--prompt", help="default: the page's default (the Brief preset)")
    parser.add_argument("--raw", action="store_true", help="open the raw output / entities accordion too")
    parser.add_argument("--refer", metavar="X1,Y1,X2,Y2", help="Refer mode: draw this box (pixels of the image) by "
                                                               "clicking its corners, then ask what it is")
    args = parser.parse_args(argv)
    executable = find_chromium()
    if executable is None:
        raise SystemExit("no Chromium found: apt-get install chromium (or set KOSMOS2_CHROMIUM)")
    image = args.image or make_examples(EXAMPLES_DIR)[0]
    log_path = args.out.with_suffix(".server.log")
    try:
        with demo_server(args.checkpoint, log_path) as url, chromium_page(executable, height=1000) as page:
            open_demo(page, url)
            upload(page, image)
            if args.refer:
                x1, y1, x2, y2 = (int(float(v)) for v in args.refer.split(","))
                set_mode(page, "Refer")
                print("box:", click_corners(page, (x1, y1), (x2, y2)))
            if args.prompt:
                set_prompt(page, args.prompt)
            print(submit_and_wait(page))
            print("highlighted:", highlighted_phrases(page))
            if args.raw:
                show_raw_output(page)
            page.screenshot(path=str(args.out), full_page=True)
    finally:
        log_path.unlink(missing_ok=True)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
