"""What a user sees: the real MLflow UI, served by ``tune-alr ui`` over a store that a
real run wrote, driven in headless Chromium.

(a) the experiment opens on the training view (Runs, "Model training"), not MLflow 3's
GenAI Overview; (b) the trials' child runs are nested under the parent run; (c) a
child run's ``lr`` chart renders. Every page is kept as a PNG in
$TUNE_ALR_TEST_ARTIFACTS (default <repo>/test-artifacts/browser/).

Selectors (MLflow 3.17 UI, checked in its DOM): the page title is the one ``h2``; the
runs table is AG Grid (``div[role=row][row-id=<run id>]``, the name in the cell
``col-id="attributes.`Run Name`"``, whose button is the nesting expander); chart cards
are ``[data-testid=experiment-view-compare-runs-card]`` titled ``h4[title=<metric>]``,
drawn by Plotly; the metric page's table rows are ``tr[data-row-key=<metric>]``.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip(
    "selenium",
    reason="selenium is not importable: pip install -c constraints.txt -e '.[browser]'",
    exc_type=ImportError,
)

from _browser import (
    artifacts_dir,
    check_png,
    chrome,
    quit_chrome,
    require_chromium,
    screenshot,
    seen,
    wait_for,
)
from _servers import UiServer
from conftest import free_port
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as EC

require_chromium()

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.browser, pytest.mark.side]

KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # MLflow's value for model training
NAME_CELL = 'div[role="row"][row-id="{}"] div[col-id="attributes.`Run Name`"]'


@dataclass(frozen=True)
class Store:
    """What the run wrote, read back with MlflowClient."""

    uri: str
    experiment_id: str
    experiment_kind: str | None
    parent_id: str
    children: dict[str, str]  # run id -> run name
    feedback_child: str  # the run id of the feedback trial
    lr_last_step: int


@pytest.fixture(scope="module")
def store(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Store:
    from mlflow.tracking import MlflowClient

    import tune_alr

    tmp = tmp_path_factory.mktemp("browser")
    uri = f"sqlite:///{tmp}/mlflow.db"
    tune_alr.run(
        tune_alr.Experiment(
            name="browser",
            tasks=["digits"],
            policies=["constant", "feedback"],
            seeds=1,
            max_steps=40,
            report_every=10,
            output=tmp / "out",
            tracking_uri=uri,
            verbose=0,
        )
    )
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("browser")
    assert experiment is not None, "the run created no MLflow experiment 'browser'"
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, f"expected one parent run, found {[r.info.run_name for r in parents]}"
    parent_id = parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    feedback = [r.info.run_id for r in children if r.data.params.get("policy") == "feedback"]
    assert len(feedback) == 1, f"expected one feedback child run, found {len(feedback)}"
    history = client.get_metric_history(feedback[0], "lr")
    assert history, "the feedback child run has no 'lr' metric"
    return Store(
        uri=uri,
        experiment_id=experiment.experiment_id,
        experiment_kind=experiment.tags.get(KIND_TAG),
        parent_id=parent_id,
        children={r.info.run_id: r.info.run_name for r in children},
        feedback_child=feedback[0],
        lr_last_step=max(m.step for m in history),
    )


@dataclass(frozen=True)
class Ui:
    """The running ``tune-alr ui``: its base URL and the training-view link it printed."""

    url: str
    training_view: str


@pytest.fixture(scope="module")
def ui(store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    """``python -m tune_alr.cli ui`` on the store."""
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    server = UiServer(store.uri, free_port(), log=log)
    try:
        server.start(timeout=120)
        link = ""
        deadline = time.monotonic() + 60  # printed once the server answers
        while not link and time.monotonic() < deadline:
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("Training view of 'browser': "):
                    link = line.split(": ", 1)[1].strip()
            time.sleep(0.5)
        assert link, f"tune-alr ui printed no training-view link: {log.read_text()[-2000:]}"
        yield Ui(server.uri, link)
    finally:
        server.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Chromium with a fresh profile: every test is a first visit (empty localStorage)."""
    driver = chrome(tmp_path / "profile")
    try:
        yield driver
    finally:
        quit_chrome(driver, tmp_path / "profile")


@pytest.fixture(scope="module")
def shots() -> Path:
    return artifacts_dir()


def _fragment(url: str) -> tuple[list[str], dict[str, str]]:
    """The hash route of a UI URL: its path segments and its query."""
    path, _, query = urllib.parse.urlsplit(url).fragment.partition("?")
    return [p for p in path.split("/") if p], dict(urllib.parse.parse_qsl(query))


def test_the_experiment_opens_on_the_training_view(
    store: Store, ui: Ui, browser: WebDriver, shots: Path
) -> None:
    # The project marks the experiment as model training, for MLflow versions that read
    # the tag; MLflow 3.17's UI takes the view from the address only (mlflow#24498), so
    # tune-alr prints the address that opens the training view: a first visit opens it.
    assert store.experiment_kind == TRAINING_KIND
    eid = store.experiment_id
    shot = shots / "a_experiment_page.png"
    browser.get(ui.training_view)

    def landed(driver: WebDriver) -> tuple[str, str, str] | bool:
        parts, query = _fragment(driver.current_url)
        if len(parts) < 3 or parts[:2] != ["experiments", eid]:
            return False
        titles = [h.text.strip() for h in driver.find_elements(By.TAG_NAME, "h2")]
        title = next((t for t in titles if t), "")
        return (parts[2], query.get("workflowType", ""), title) if title else False

    landing = wait_for(browser, landed, f"experiment {eid}'s page to open on a tab", shot)
    assert isinstance(landing, tuple)
    time.sleep(3)  # let the page paint before the screenshot
    check_png(screenshot(browser, shot))
    tab, workflow, title = landing
    assert (tab, workflow, title) == ("runs", "machine_learning", "Runs"), (
        f"the link tune-alr printed ({ui.training_view}) opened {title!r} (workflowType "
        f"{workflow!r}, tab {tab!r}, url {browser.current_url}), not the training view "
        f"'Runs' (screenshot {shot})"
    )


def test_child_runs_are_nested_under_their_parent_run(
    store: Store, ui: Ui, browser: WebDriver, shots: Path
) -> None:
    assert len(store.children) == 2, f"expected 2 child runs, the store has {store.children}"
    eid = store.experiment_id
    browser.get(f"{ui.url}/#/experiments/{eid}/runs?workflowType=machine_learning")
    parent_cell = wait_for(
        browser,
        EC.visibility_of_element_located((By.CSS_SELECTOR, NAME_CELL.format(store.parent_id))),
        "the parent run's row in the runs table",
        shots / "b_runs_table.png",
    )

    def visible_children(driver: WebDriver) -> list[WebElement]:
        cells = [driver.find_elements(By.CSS_SELECTOR, NAME_CELL.format(c)) for c in store.children]
        return [c[0] for c in cells if c and c[0].is_displayed()]

    time.sleep(2)  # the table settles (columns, colours) before the first screenshot
    expanded_at_first = len(visible_children(browser)) == len(store.children)
    check_png(screenshot(browser, shots / "b_runs_table.png"))
    if not expanded_at_first:
        expander = parent_cell.find_elements(By.TAG_NAME, "button")
        assert expander, (
            f"the children are not shown and the parent row has no expander; saw {seen(browser)}"
        )
        expander[0].click()
        wait_for(
            browser,
            lambda d: len(visible_children(d)) == len(store.children),
            "the child runs' rows after expanding the parent",
            shots / "b_nested_runs.png",
        )
        time.sleep(1)
    check_png(screenshot(browser, shots / "b_nested_runs.png"))

    def row(run_id: str) -> tuple[int, float, str]:
        """(row index, x of the run's link, the link's text) of a run in the table."""
        cell = browser.find_element(By.CSS_SELECTOR, NAME_CELL.format(run_id))
        index = cell.find_element(By.XPATH, "./ancestor::div[@role='row']").get_attribute(
            "row-index"
        )
        link = cell.find_element(By.CSS_SELECTOR, f'a[href$="/runs/{run_id}"]')
        return int(index or -1), link.location["x"], (link.get_attribute("textContent") or "")

    p_index, p_x, p_name = row(store.parent_id)
    rows = {run_id: row(run_id) for run_id in store.children}
    below = sorted(index for index, _, _ in rows.values())
    assert below == list(range(p_index + 1, p_index + 1 + len(rows))), (
        f"the child runs are not the rows right under their parent {p_name!r} "
        f"(row {p_index}): rows {below}"
    )
    for run_id, (_, x, name) in rows.items():
        assert name == store.children[run_id], f"row of {run_id} reads {name!r}"
        assert x > p_x + 8, (
            f"child {name!r} is not indented under its parent {p_name!r} "
            f"(link at x={x}, the parent's at x={p_x})"
        )


def test_a_child_runs_lr_chart_renders(
    store: Store, ui: Ui, browser: WebDriver, shots: Path
) -> None:
    eid, run_id = store.experiment_id, store.feedback_child
    name = store.children[run_id]
    browser.get(f"{ui.url}/#/experiments/{eid}/runs/{run_id}?workflowType=machine_learning")
    tab = wait_for(
        browser,
        EC.element_to_be_clickable(
            (By.XPATH, '//button[@role="tab"][normalize-space(.)="Model metrics"]')
        ),
        f"the 'Model metrics' tab of run {name!r}",
        shots / "c_lr_chart.png",
    )
    tab.click()
    search = wait_for(
        browser,
        EC.element_to_be_clickable((By.CSS_SELECTOR, 'input[placeholder="Search metric charts"]')),
        "the 'Search metric charts' box",
        shots / "c_lr_chart.png",
    )
    search.send_keys("lr")

    def lr_card(driver: WebDriver) -> WebElement | bool:
        for card in driver.find_elements(
            By.CSS_SELECTOR, '[data-testid="experiment-view-compare-runs-card"]'
        ):
            drawn = card.find_elements(By.CSS_SELECTOR, ".js-plotly-plot path.js-line")
            if card.find_elements(By.CSS_SELECTOR, 'h4[title="lr"]') and any(
                (line.get_attribute("d") or "").startswith("M") for line in drawn
            ):
                return card
        return False

    card = wait_for(browser, lr_card, "a drawn 'lr' chart card", shots / "c_lr_chart.png")
    assert isinstance(card, WebElement)
    time.sleep(1)
    check_png(screenshot(browser, shots / "c_lr_chart.png"))
    assert f"{name} (lr)" in card.text, f"the lr chart's legend reads {card.text!r}"

    # The metric page: the lr curve and its latest value (the route the UI builds).
    metric = urllib.parse.quote(json.dumps("lr"), safe="")
    keys = urllib.parse.quote(json.dumps(["lr"]), safe="")
    browser.get(
        f"{ui.url}/#/metric?runs={json.dumps([run_id])}&metric={metric}"
        f"&experiments={json.dumps([eid])}&plot_metric_keys={keys}"
        "&plot_layout={}&x_axis=step&y_axis_scale=linear&line_smoothness=1&show_point=false"
        "&deselected_curves=[]&last_linear_y_axis_range=[]&workflowType=machine_learning"
    )
    latest = wait_for(
        browser,
        EC.visibility_of_element_located((By.CSS_SELECTOR, 'tr[data-row-key="lr"] td[title]')),
        "the 'lr' row of the metric page's table",
        shots / "c_lr_metric_page.png",
    )
    wait_for(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot path.js-line"),
        "the metric page's lr curve",
        shots / "c_lr_metric_page.png",
    )
    time.sleep(1)
    check_png(screenshot(browser, shots / "c_lr_metric_page.png"))
    assert f"(step={store.lr_last_step})" in (latest.get_attribute("title") or ""), (
        f"the metric page's latest lr reads {latest.get_attribute('title')!r}, "
        f"not at the last step {store.lr_last_step}"
    )
