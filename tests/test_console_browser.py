"""The console in a real headless Chromium against a live `strata serve` on tiny models, with API keys on
and off: log in (keys on), submit a merge from the editor and follow it to the end, see the new lineage
edge, watch a profile job live in the jobs view, and generate at a loose and a tight budget in the
playground and get two depths. Every request the browser makes must go to the server itself; screenshots
of each view go to a temporary directory, or to $STRATA_CONSOLE_SHOTS (`make console-shots` refreshes
docs/console/ that way): a test run never rewrites tracked files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import redis as redis_lib
import yaml

from service.queue import JobQueue
from service.schemas import ProfileJobRequest
from tests.conftest import _real_redis, start_server, stop_server
from tests.tiny_models import make_tiny_chat_llama, make_variant
from workers.settings import Settings
from workers.store.registry import ModelRecord, Registry

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

DOCS_SHOTS = Path(__file__).resolve().parent.parent / "docs" / "console"
SHOTS_ENV = "STRATA_CONSOLE_SHOTS"  # where screenshots go; unset: a temporary directory
KEY = "console-test-key"
RECIPE = """merge_method: ties
base_model: c-base
models:
  - model: c-a
    parameters: {weight: 0.5, density: 0.6}
  - model: c-b
    parameters: {weight: 0.5, density: [0.4, 0.8]}
parameters: {normalize: true}
dtype: float32
name: c-merged
"""


@pytest.fixture(scope="module", params=["keys-off", "keys-on"])
def live(request, tmp_path_factory):
    """A `strata serve` with three homologous tiny chat models imported, with or without API keys."""
    root = tmp_path_factory.mktemp(f"console-{request.param}")
    keyed = request.param == "keys-on"
    for url in _real_redis(root / "redis"):
        server = start_server(root / "home", {"REDIS_URL": url, "STRATA_API_KEYS": KEY if keyed else None})
        try:
            family = root / "family"
            make_tiny_chat_llama(family / "base", seed=0)
            make_variant(family / "base", family / "a", seed=1, scale=0.01)
            make_variant(family / "base", family / "b", seed=2, scale=0.02)
            headers = {"Authorization": f"Bearer {KEY}"} if keyed else {}
            with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
                for name in ("base", "a", "b"):
                    r = c.post("/v1/models/import", json={"id": f"c-{name}", "path": str(family / name)})
                    assert r.status_code == 201, r.text
            yield server, keyed
        finally:
            stop_server(server)


class Browser:
    """Chromium through chromedriver, recording the URL of every request any page makes (CDP log)."""

    def __init__(self, base_url: str):
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM or "/usr/bin/chromium"
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1360,1000",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-sync",
            "--disable-extensions",
        ):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        service = webdriver.ChromeService(executable_path=CHROMEDRIVER or "/usr/bin/chromedriver")
        self.driver = webdriver.Chrome(options=options, service=service)
        self.base_url = base_url
        self.requested: list[str] = []
        self.console: list[dict] = []

    def collect(self) -> None:
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self.requested.append(message["params"]["request"]["url"])
        self.console += self.driver.get_log("browser")

    def assert_only_local_requests(self) -> None:
        self.collect()
        assert self.requested, "the request log is empty: CDP network logging is not working"
        foreign = [u for u in self.requested if urlparse(u).hostname != "127.0.0.1"]
        assert not foreign, f"the console made non-local requests: {foreign}"

    def wait(self, condition: Callable, timeout: float = 120, what: str = "") -> object:
        """Poll `condition` until it holds; an element the console re-rendered while the condition read it
        (stale) or has not rendered yet counts as "not yet", not as a failure."""
        return WebDriverWait(
            self.driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
        ).until(lambda d: condition(d), message=what or "condition")

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def present(self, css: str, timeout: float = 120):
        return self.wait(lambda d: d.find_elements(By.CSS_SELECTOR, css), timeout, f"{css} present")[0]

    def view(self, name: str) -> None:
        self.find(f'#nav a[data-view="{name}"]').click()
        ready = "return document.body.dataset.ready"
        self.wait(lambda d: d.execute_script(ready) == name, 60, f"view {name}")

    def set_value(self, css: str, value: str) -> None:
        self.driver.execute_script(
            "const e = document.querySelector(arguments[0]); e.value = arguments[1];"
            "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));",
            css,
            value,
        )

    shots: Path | None = None  # set by the fixture

    def shot(self, name: str, save: bool) -> None:
        if save and self.shots is not None:
            self.shots.mkdir(parents=True, exist_ok=True)
            height = self.driver.execute_script("return document.documentElement.scrollHeight")
            self.driver.set_window_size(1360, max(1000, min(height + 140, 2400)))  # the whole page
            self.driver.save_screenshot(str(self.shots / f"{name}.png"))
            self.driver.set_window_size(1360, 1000)

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return Path(os.environ[SHOTS_ENV]) if os.environ.get(SHOTS_ENV) else tmp_path_factory.mktemp("shots")


@pytest.fixture
def browser(live, shots):
    server, _ = live
    b = Browser(server.url)
    b.shots = shots
    yield b
    b.quit()


def tracked_shots() -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in DOCS_SHOTS.glob("*.png")}


def test_console_merges_follows_shows_lineage_and_buys_depth_with_a_budget(live, browser):
    server, keyed = live
    b = browser
    save = keyed  # the keyed run also shows the login view; its screenshots are kept
    tracked = tracked_shots()
    b.driver.get(f"{server.url}/")

    # 1. Login: with keys, nothing but the login view renders until a key the server accepts is given.
    if keyed:
        b.present("#login")
        assert b.find("#nav").get_attribute("hidden") is not None
        assert not b.find_all("#models-table")
        b.shot("login", save)
        b.find("#api-key").send_keys("wrong-key")
        b.find("#login button[type=submit]").click()
        b.wait(lambda d: "refused" in d.find_element(By.ID, "login-message").text, 30, "key refused")
        assert not b.find_all("#models-table")
        b.find("#api-key").send_keys(KEY)
        b.find("#login button[type=submit]").click()
    else:
        assert not b.find_all("#login")
    b.present('#models-table tr[data-model="c-b"]')

    # 2. Merge editor: validate (per-tensor parameters, nothing queued), submit, follow to the end.
    b.view("merge")
    b.set_value("#merge-yaml", RECIPE)
    b.find("#merge-validate").click()
    b.present("#merge-valid")
    rows = b.find_all("#plan-table tbody tr")
    assert len(rows) == 4 * 9 + 3
    name = "model.layers.3.mlp.up_proj.weight"
    up = next(r for r in rows if r.find_element(By.CSS_SELECTOR, "td").text == name)
    assert "density=0.8" in up.text and "density=0.6" in up.text and "normalize=true" in up.text
    b.find("#merge-submit").click()

    def finished(d) -> bool:  # read in the page: the panel is redrawn on every event
        status = d.execute_script("return document.querySelector('#merge-job')?.dataset.status")
        return status in ("finished", "failed")

    b.wait(finished, 180, "the merge job ends")
    assert b.find("#merge-job").get_attribute("data-status") == "finished", b.find("#merge-job").text
    assert b.find("#merge-job .progress").get_attribute("aria-valuenow") == "100"
    assert "Registered c-merged" in b.find("#merge-job").text
    b.shot("merge", save)

    # 3. Lineage: the new model's edges from each parent, labelled with the recipe's method.
    b.find("#show-lineage").click()
    b.present('#lineage g.node[data-model="c-merged"]')
    for parent in ("c-base", "c-a", "c-b"):
        b.find(f'#lineage g.edge[data-parent="{parent}"][data-child="c-merged"]')
    (label,) = b.find_all('#lineage text.edge-label[data-child="c-merged"]')  # one per child, not per edge
    assert label.text == "ties"
    headers = {"Authorization": f"Bearer {KEY}"} if keyed else {}
    recipe = httpx.get(f"{server.url}/v1/models/c-merged", headers=headers).json()["strata"]["recipe"]
    assert recipe.pop("kind") == "merge"
    assert yaml.safe_load(b.find("#recipe-yaml").text) == recipe  # the YAML shown is the stored recipe

    # 4. Jobs: profile the merged model from its page and watch the job live until it finishes.
    b.find("#profile-model").click()
    b.wait(lambda d: d.execute_script("return document.body.dataset.ready") == "jobs", 30, "jobs view")
    finished_kinds = (  # read in the page: the table is redrawn on every event
        "return [...document.querySelectorAll('#jobs-table tr[data-job][data-status=finished]')]"
        ".map((row) => row.cells[1].textContent).sort()"
    )
    b.wait(lambda d: d.execute_script(finished_kinds) == ["merge", "profile"], 300, "profile finished")
    b.shot("jobs", save)

    # 5. Playground: a loose and a tight budget on the merged model choose two different depths.
    b.view("playground")
    b.present('#pg-model option[value="c-merged"]')
    b.set_value("#pg-model", "c-merged")
    b.set_value("#pg-input", "the cat sat")
    b.set_value("#pg-max-tokens", "6")
    depths, qualities = [], []
    for position in ("1000", "0"):  # 100 s, then 1 ms
        b.set_value("#pg-budget", position)
        b.find("#pg-run").click()
        runs = len(depths) + 1
        b.wait(lambda d, n=runs: len(d.find_elements(By.CSS_SELECTOR, "#pg-history tbody tr")) == n, 120)
        depths.append(b.find("#pg-history tbody tr").get_attribute("data-depth"))
        assert b.find('#pg-stats dd[data-field="budget met"]').text in ("yes", "no")
        assert "ms" in b.find('#pg-stats dd[data-field="predicted latency"]').text
        qualities.append(b.find('#pg-stats dd[data-field="exit quality"]').text)
    assert depths == ["4", "1"], depths
    assert "perplexity 1.00× full depth, top-1 agreement 100%" in qualities[0]
    assert qualities[1] == "not profiled at depth 1 (profiled: 2, 4)"  # the default grid: every 2 + full
    assert b.find('#pg-stats dd[data-field="budget met"]').text == "no"  # nothing runs in 1 ms
    b.shot("playground", save)

    # Chat, without a budget, drafting with the first 2 layers: full depth, and the draft statistics.
    b.set_value("#pg-mode", "chat")
    b.set_value("#pg-input", "hello")
    b.find("#pg-use-budget").click()
    b.find("#pg-spec").click()
    b.set_value("#pg-draft-depth", "2")
    b.find("#pg-run").click()
    b.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pg-history tbody tr")) == 3, 120, "chat run")
    assert b.find("#pg-history tbody tr").get_attribute("data-depth") == "4"
    assert "draft depth 2" in b.find('#pg-stats dd[data-field="speculative"]').text
    assert [e.get_attribute("class") for e in b.find_all("#pg-chat .msg")] == ["msg user", "msg assistant"]

    # 6. Models: the merged model's recipe and its profile plotted over depth.
    b.view("models")
    b.find('#models-table tr[data-model="c-merged"]').click()
    b.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model-detail svg.chart")) == 3, 30, "3 plots")
    assert b.find_all("#model-detail svg.chart .series circle")
    b.shot("models", save)

    b.assert_only_local_requests()
    assert any(u.endswith("/v1/merges/validate") for u in b.requested)
    assert any("/events" in u for u in b.requested)
    errors = [e for e in b.console if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert not errors, errors
    if save:
        views = ("merge", "jobs", "playground", "models", "login")
        assert {p.name for p in b.shots.glob("*.png")} >= {f"{n}.png" for n in views}
    if b.shots.resolve() != DOCS_SHOTS.resolve():
        assert tracked_shots() == tracked  # docs/console/ is refreshed by `make console-shots` only


def test_the_request_guard_catches_a_request_that_leaves_the_machine():
    """The guard above can fail: a page that loads an image from a non-local address trips it."""
    b = Browser("http://127.0.0.1")
    try:
        b.driver.get('data:text/html,<img src="http://192.0.2.1/pixel.png">')  # TEST-NET-1: never answers
        with pytest.raises(AssertionError, match="non-local requests.*192.0.2.1"):
            b.assert_only_local_requests()
    finally:
        b.quit()


OVERLAPS = """
const boxes = [...document.querySelectorAll(arguments[0])].map((e) => e.getBoundingClientRect());
const hits = [];
boxes.forEach((a, i) => boxes.slice(i + 1).forEach((b) => {
  const apart = a.right <= b.left || b.right <= a.left || a.bottom <= b.top || b.bottom <= a.top;
  if (a.width && b.width && !apart) hits.push(i);
}));
return hits.length;
"""


def fake_record(model_id: str, parents: list[str] = (), method: str | None = None, **extra) -> ModelRecord:
    recipe = {"kind": "merge", "merge_method": method} if method in ("ties", "slerp") else None
    if method and recipe is None:
        recipe = {"kind": method}
    return ModelRecord(
        id=model_id,
        architecture="LlamaForCausalLM",
        num_layers=30,
        num_parameters=134_515_008,
        dtype="float32",
        size_bytes=538_000_000,
        parents=list(parents),
        recipe=recipe,
        **extra,
    )


def huge_ratio_profile() -> dict:
    """A profile whose shallow exits are 1e8 times as perplexed as full depth (as unfitted exits are)."""
    depths = [2, 10, 20, 30]
    ratio = {2: 1.5e8, 10: 3e5, 20: 40.0, 30: 1.0}
    return {
        "device": "cpu (2 threads)",
        "dtype": "float32",
        "num_layers": 30,
        "grid": depths,
        "created_at": "2026-12-06T02:00:00Z",
        "latency": {
            "num_layers": 30,
            "scale": 1.0,
            "depths": {
                str(k): {"a_ms": 2.0 + k, "b_ms_per_prompt_token": 0.05 * k, "c_ms_per_new_token": 1.0 + k}
                for k in depths
            },
        },
        "quality": {
            str(k): {
                "depth": k,
                "perplexity": 9.5 * ratio[k],
                "top1_agreement": min(1.0, k / 30),
                "tokens": 2047,
            }
            for k in depths
        },
    }


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """A server (no workers) whose registry holds ~30 models: a base, 16 variants, merges of merges, a model
    with exit adapters and a huge perplexity range, a LoRA adapter, and one with a queued profile job."""
    root = tmp_path_factory.mktemp("console-crowded")
    for url in _real_redis(root / "redis"):
        server = start_server(root / "home", {"REDIS_URL": url}, workers=0, infer_workers=0)
        try:
            conn = redis_lib.Redis.from_url(url)
            registry = Registry(conn)
            records = [fake_record("smollm2-135m-instruct")]
            records += [
                fake_record(f"smollm2-135m-instruct-variant-{i}", ["smollm2-135m-instruct"], "variants")
                for i in range(1, 17)
            ]
            v = "smollm2-135m-instruct-variant-"
            records += [
                fake_record("smol-ties", ["smollm2-135m-instruct", f"{v}1", f"{v}2"], "ties"),
                fake_record("smol-slerp", [f"{v}3", f"{v}4"], "slerp"),
                fake_record("smol-ties-sparse", ["smol-ties"], "sparsify"),
                fake_record("smol-ties-pruned", ["smol-ties"], "prune"),
                fake_record("smol-ties-24", ["smol-ties"], "truncate"),
                fake_record("smol-deep", ["smol-ties", "smol-slerp"], "ties"),
                fake_record(
                    "smol-exits",
                    ["smollm2-135m-instruct"],
                    "sort",
                    profile=huge_ratio_profile(),
                    exit_adapters={"exits": [15, 21, 24, 27], "recipe": {}, "data": {}, "fit": {}},
                ),
                fake_record(
                    "smol-lora",
                    ["smollm2-135m-instruct"],
                    "extract_lora",
                    type="adapter",
                    base_model="smollm2-135m-instruct",
                ),
                fake_record("other-base"),
                fake_record("other-base-2x", ["other-base"], "grow"),
                fake_record("waiting"),
            ]
            for record in records:
                assert registry.add(record)
            settings = Settings(home=root / "home", redis_url=url, default_model=False)
            JobQueue(conn, settings).submit(ProfileJobRequest(kind="profile", model="waiting"))
            yield server
        finally:
            stop_server(server)


def test_the_console_stays_legible_with_thirty_models(crowded, browser_for, shots):
    b = browser_for(crowded.url)
    b.driver.get(f"{crowded.url}/#models")
    b.present('#lineage g.node[data-model="smol-deep"]')

    # lineage: the 16 variants are one node until expanded; no two labels or nodes overlap
    (group,) = b.find_all("#lineage g.node.group")
    assert group.text.startswith("12 × variants")  # the 4 variants that were merged stay apart
    assert not b.find_all('#lineage g.node[data-model="smollm2-135m-instruct-variant-9"]')
    assert b.driver.execute_script(OVERLAPS, "#lineage text.edge-label") == 0
    assert b.driver.execute_script(OVERLAPS, "#lineage g.node rect") == 0
    assert b.find(
        '#lineage g.node[data-model="smollm2-135m-instruct-variant-1"]'
    )  # a parent of a merge: shown
    b.shot("lineage", True)
    group.click()
    b.present('#lineage g.node[data-model="smollm2-135m-instruct-variant-9"]')
    assert b.driver.execute_script(OVERLAPS, "#lineage text.edge-label") == 0
    assert b.driver.execute_script(OVERLAPS, "#lineage g.node rect") == 0
    width = int(b.find("#lineage").get_attribute("width"))
    b.find("#lineage-zoom-out").click()
    assert int(b.find("#lineage").get_attribute("width")) < width
    b.find("#lineage-collapse").click()
    b.present("#lineage g.node.group")

    # the table: exits, not a record's field names; an adapter is no 30-layer model
    row = b.find('#models-table tr[data-model="smol-exits"]')
    assert "exits 15, 21, 24, 27" in row.text and "recipe" not in row.text
    cells = [td.text for td in b.find_all('#models-table tr[data-model="smol-lora"] td')]
    assert cells[2] == "—" and "LoRA adapter of smollm2-135m-instruct" in cells

    # profile status: an adapter is not offered a profile; a queued profile says so
    b.find('#models-table tr[data-model="smol-lora"]').click()
    b.wait(
        lambda d: d.find_element(By.ID, "profile-status").get_attribute("data-state") == "adapter",
        30,
        "adapter",
    )
    assert not b.find_all("#profile-model")
    b.find('#models-table tr[data-model="waiting"]').click()
    b.wait(
        lambda d: d.find_element(By.ID, "profile-status").get_attribute("data-state") == "queued",
        30,
        "queued",
    )
    assert not b.find_all("#profile-model") and "Not profiled yet" not in b.find("#model-detail").text
    failed = b.driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('/console/models.js').then((m) => done(m.profileStatus({type: 'model'},"
        " {status: 'failed', error: 'ValueError: no config.json'})));"
    )
    assert failed == {"state": "failed", "text": "The profile job failed: ValueError: no config.json"}

    # the perplexity-ratio chart spans 1 .. 1.5e8 on a log axis, its title clear of every tick
    b.find('#models-table tr[data-model="smol-exits"]').click()
    b.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model-detail svg.chart")) == 3, 30, "3 plots")
    ratio = b.find('#model-detail svg.chart[aria-label="Perplexity ratio to full depth"]')
    assert ratio.get_attribute("data-scale") == "log"
    ticks = [t.text for t in ratio.find_elements(By.CSS_SELECTOR, "text.tick")]
    assert "1" in ticks and "100M" in ticks
    clash = """
    const svg = arguments[0]; const title = svg.querySelector('.chart-title').getBoundingClientRect();
    return [...svg.querySelectorAll('text.tick, text.legend-text')].filter((t) => {
      const r = t.getBoundingClientRect();
      return r.left < title.right && title.left < r.right && r.top < title.bottom && title.top < r.bottom;
    }).length;
    """
    assert b.driver.execute_script(clash, ratio) == 0
    b.assert_only_local_requests()


@pytest.fixture
def browser_for(shots):
    opened = []

    def open_(url: str) -> Browser:
        b = Browser(url)
        b.shots = shots
        opened.append(b)
        return b

    yield open_
    for b in opened:
        b.quit()
