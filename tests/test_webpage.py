"""The static leaderboard page: files and links, escaping, and a real headless Chromium.

The browser test drives Debian's ``chromium`` through ``chromium-driver`` with Selenium, from a
``file://`` URL (no server, no network). It skips when either is missing, unless
``RBALM_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes a missing browser a failure. Screenshots
go to ``test-artifacts/`` at the top of the checkout (or ``$RBALM_ARTIFACTS``).
"""

import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustbench_alm.cli import main
from robustbench_alm.entry import write_entry
from robustbench_alm.leaderboard import entries_frame, render_markdown
from robustbench_alm.robustbench_io import from_model_info
from robustbench_alm.webpage import build_site
from tests.test_entry import make_entry
from tests.test_per_example import make_arrays, write_evaluated

ARTIFACTS = Path(os.environ.get("RBALM_ARTIFACTS",
                                Path(__file__).resolve().parents[1] / "test-artifacts"))
HOSTILE = '<script>alert("x")</script>'


def _reported(entry_id, clean, autoattack, external=None, unreliable=None):
    record = {"name": f"Paper of {entry_id}", "authors": "A. Author", "link": "",
              "architecture": "WideResNet-28-10", "dataset": "fashion-mnist", "eps": "0.1",
              "clean_acc": str(clean), "autoattack_acc": str(autoattack), "reported": "70",
              "additional_data": False, "number_forward_passes": 1, "venue": "ICML 2021"}
    if external is not None:
        record["external"] = str(external)
    if unreliable is not None:
        record["unreliable"] = unreliable
    return from_model_info(record, threat_model="Linf", entry_id=entry_id,
                           file=f"fashion-mnist/Linf/{entry_id}.json")


@pytest.fixture(scope="module")
def leaderboard(tmp_path_factory):
    """Two evaluated entries with rows, one without, three reported, and an L2 board."""
    root = tmp_path_factory.mktemp("lb")
    write_evaluated(root, "cnn-amo-pgd", make_arrays(n=150, seed=0, scale=0.15),
                    name=f"AMO-PGD {HOSTILE}")
    write_evaluated(root, "cnn-pgd-at", make_arrays(n=150, seed=1, p_clean=0.7, scale=0.2))
    write_entry(root, make_entry(entry_id="cnn-standard", clean_acc=90.0, robust_acc=3.0,
                                 autoattack_acc=3.0, flags=["out-of-budget:square"]))
    write_entry(root, _reported("Rb2021Strong", 88.5, 72.0, external=69.5, unreliable=True))
    write_entry(root, _reported("Rb2020Middle", 84.0, 55.25))
    write_entry(root, _reported("Rb2019Weak", 95.0, 12.0, unreliable=False))
    write_entry(root, make_entry(entry_id="cnn-l2", threat_model="L2", eps=1.5, eps_text="1.5",
                                 autoattack_acc=None))
    return root


@pytest.fixture(scope="module")
def site(leaderboard, tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    assert main(["leaderboard", "--dir", str(leaderboard), "--html", str(out),
                 "--csv", str(out / "extra.csv")]) == 0
    return out


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value and "://" not in value:
                self.targets.append(value.split("#")[0])


def _local_links(page: Path) -> list[str]:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return [t for t in parser.targets if t]


def test_site_files_and_links(site, leaderboard):
    index = site / "index.html"
    pages = [index, *sorted((site / "entries").rglob("*.html"))]
    assert len(pages) == 1 + 7
    for page in pages:
        for target in _local_links(page):
            assert (page.parent / target).is_file(), f"{page.name} links to missing {target}"

    html = index.read_text()
    assert html.count('<section class="board"') == 2
    assert "entries/fashion-mnist/Linf/cnn-amo-pgd.html" in html
    assert '<span class="flag">out-of-budget:square</span>' in html
    assert "fashion-mnist-Linf-clean-vs-robust.png" in html
    # Markdown and CSV from the same frame as the page.
    frame = entries_frame(leaderboard)
    assert (site / "leaderboard.md").read_text() == render_markdown(frame)
    csv = pd.read_csv(site / "leaderboard.csv")
    assert list(csv.entry_id) == list(frame.entry_id)
    assert (site / "extra.csv").read_text() == (site / "leaderboard.csv").read_text()


def test_detail_pages(site):
    page = (site / "entries/fashion-mnist/Linf/cnn-amo-pgd.html").read_text()
    assert HOSTILE not in page and "&lt;script&gt;" in page  # autoescaped
    for text in ("Attack stages", "Margins", "Provenance", "cnn-amo-pgd-robustness.png",
                 "cnn-amo-pgd-margins.svg", "cnn-amo-pgd.examples.parquet", "c" * 64):
        assert text in page, text
    reported = (site / "entries/fashion-mnist/Linf/Rb2021Strong.html").read_text()
    assert "Reported, not re-evaluated here" in reported
    assert "69.50%" in reported and "72.00%" in reported  # best known and AutoAttack
    assert "autoattack-unreliable" in reported
    no_rows = (site / "entries/fashion-mnist/Linf/cnn-standard.html").read_text()
    assert "No per-example results" in no_rows


def test_site_without_plots(leaderboard, tmp_path):
    index = build_site(leaderboard, tmp_path / "bare", plots=False)
    assert index.is_file() and not (tmp_path / "bare" / "plots").exists()
    for target in _local_links(index):
        assert (index.parent / target).is_file(), target


# --- the real browser ------------------------------------------------------------------------

def _browser_paths():
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)),
                   None)
    return browser, shutil.which("chromedriver")


@pytest.fixture(scope="module")
def driver():
    browser, chromedriver = _browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        browser = None
    if browser is None or chromedriver is None:
        reason = ("headless Chromium not available: install the Debian packages chromium and "
                  "chromium-driver and the Python package selenium")
        if os.environ.get("RBALM_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never looks for one on the network.
    chrome = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    chrome.set_page_load_timeout(30)
    yield chrome
    chrome.quit()


def _column(table, index):
    return [row.find_elements("tag name", "td")[index].get_attribute("data-value")
            for row in table.find_elements("css selector", "tbody tr") if row.is_displayed()]


def _heading_index(table, title):
    headings = [h.text.strip(" \u25b2\u25bc") for h in table.find_elements("css selector",
                                                                           "thead th")]
    return headings.index(title)


def test_page_in_headless_chromium(driver, site):
    driver.get((site / "index.html").as_uri())
    assert driver.title == "Leaderboards: robustbench-alm"
    table = driver.find_element("id", "table-fashion-mnist-Linf")

    # It renders: the rows, ranked by robust accuracy, best first.
    robust = _heading_index(table, "Robust %")
    entries = _heading_index(table, "Entry")
    shown = [float(v) for v in _column(table, robust)]
    assert len(shown) == 6 and shown == sorted(shown, reverse=True)
    assert _column(table, entries)[0] == "Rb2021Strong"

    # Sorting: clean accuracy, best first, then reversed.
    clean = _heading_index(table, "Clean %")
    button = table.find_elements("css selector", "thead th button")[clean]
    button.click()
    values = [float(v) for v in _column(table, clean)]
    assert values == sorted(values, reverse=True) and values[0] == 95.0
    assert table.find_elements("css selector", "thead th")[clean].get_attribute(
        "aria-sort") == "descending"
    button.click()
    assert [float(v) for v in _column(table, clean)] == sorted(values)
    # Text columns sort A to Z; missing margins go last either way.
    table.find_elements("css selector", "thead th button")[entries].click()
    ids = _column(table, entries)
    assert ids == sorted(ids, key=str.lower)
    margin = _heading_index(table, "Input distance (median)")
    table.find_elements("css selector", "thead th button")[margin].click()
    assert _column(table, margin)[-1] is None

    # Filtering by text, and hiding the reported rows.
    section = driver.find_element("id", "fashion-mnist-Linf")
    box = section.find_element("css selector", "input.filter")
    box.send_keys("cnn")
    assert sorted(_column(table, entries)) == ["cnn-amo-pgd", "cnn-pgd-at", "cnn-standard"]
    assert section.find_element("css selector", ".count").text == "3 entries"
    box.clear()
    box.send_keys(" ")  # an input event with no words: every row again
    section.find_element("css selector", "input.hide-reported").click()
    assert all(not i.startswith("Rb") for i in _column(table, entries))
    section.find_element("css selector", "input.hide-reported").click()
    table.find_elements("css selector", "thead th button")[0].click()  # back to the rank
    driver.execute_script("arguments[0].scrollIntoView()", section)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "leaderboard.png"
    assert driver.save_screenshot(str(shot))
    _check_screenshot(shot)

    # A row links to its detail page, whose plots load.
    table.find_element("link text", "cnn-amo-pgd").click()
    assert driver.title.startswith("cnn-amo-pgd")
    images = driver.find_elements("css selector", ".plots img")
    assert len(images) == 2
    assert all(driver.execute_script("return arguments[0].complete && "
                                     "arguments[0].naturalWidth > 0", img) for img in images)
    assert driver.save_screenshot(str(ARTIFACTS / "entry.png"))

    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def _check_screenshot(path: Path) -> None:
    """A real page: the window's size, and many colours (text, table, badges), not a blank."""
    from matplotlib.image import imread

    pixels = imread(path)
    assert pixels.shape[0] >= 800 and pixels.shape[1] >= 1300, pixels.shape
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 100, f"only {len(colours)} colours: a blank page?"
