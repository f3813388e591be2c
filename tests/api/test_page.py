"""The web page at / in a real headless Chromium (playwright's sync API), against the real app
served by a live uvicorn over HTTP.

A person's day with the page: sign in with a pasted token, see the people grid with covers that
really load, rename a person, merge the page's top suggestion, hide a person, "not this person" on
a face, undo, sign out. Every step is checked again after a reload of the page, and through the API,
so what it shows is on the server and not only in the page.

The library is real faces (LFW photos) with synthetic embeddings, one base direction per person,
so merge suggestions have a known right answer: one person split in two through the API has the
other half as its top suggestion. A second test scrolls a grid of 2,000 people to its end.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from apilibrary import DIM, MODEL, seed_library
from badinput import lfw_dev
from browser import CHROMIUM_ARGS, chromium_path
from apiserver import LiveApi, start_api, stop_api
from facecore.types import FaceRecord, PhotoResult
from services import tokens
from services.persons import service as person_service
from services.store import repository as repo
from services.store.db import make_engine, session_factory

# Deep-funneled LFW photos are 250x250 with the named person's face centred in this box.
LFW_SIZE = (250, 250)
LFW_BOX = (75.0, 70.0, 175.0, 185.0)
# Colin Powell is seeded as one person and split in two through the API; the others stay whole.
PEOPLE = {"Colin_Powell": 6, "Tony_Blair": 3, "Hugo_Chavez": 3, "Jacques_Chirac": 3, "Laura_Bush": 3}
MANY = 2000
VIEWPORT = {"width": 1280, "height": 900}


# ------------------------------------------------------------------------------ seeding


def _face(embedding: np.ndarray, k: int = 0, box=LFW_BOX) -> FaceRecord:
    return FaceRecord(index=0, box=np.array(box, np.float32), landmarks=np.zeros((5, 2), np.float32),
                      det_score=0.99 - 0.01 * k, blur=0.8, blurry=False, trash_score=0.1, is_trash=False,
                      embedding=embedding / np.linalg.norm(embedding), model_version=MODEL, attributes={})


def seed_lfw_people(session, user_name: str, root: Path) -> dict[str, list[int]]:
    """LFW photos of :data:`PEOPLE` copied under ``root`` and stored for ``user_name``, one face
    each, clustered into their true persons; returns LFW name -> face ids. Commits."""
    rng = np.random.default_rng(7)
    user = repo.get_or_create_user(session, user_name)
    repo.set_library_root(session, user.id, str(root.resolve()))
    images = lfw_dev() / "images"
    faces: dict[str, list[int]] = {}
    labels: dict[int, int] = {}
    for label, (name, n) in enumerate(PEOPLE.items()):
        base = rng.standard_normal(DIM).astype(np.float32)
        for k, src in enumerate(sorted((images / name).glob("*.jpg"))[:n]):
            uri = f"{user_name}/{src.name}"
            (root / uri).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, root / uri)
            result = PhotoResult(key=uri, sha256=hashlib.sha256(src.read_bytes()).hexdigest(), width=LFW_SIZE[0],
                                 height=LFW_SIZE[1],
                                 faces=[_face(base + 0.35 * rng.standard_normal(DIM).astype(np.float32), k)])
            face_id = repo.save_photo_result(session, user.id, uri, result).face_ids[0]
            faces.setdefault(name, []).append(face_id)
            labels[face_id] = label
        assert len(faces[name]) == n, f"LFW-dev has fewer than {n} photos of {name}"
    person_service.apply_clustering(session, user.id, labels)
    session.commit()
    return faces


def seed_many_people(session, user_name: str, n: int) -> None:
    """``n`` persons of one face each, through the repository and the rules layer; the photo
    files are not written, so their thumbnails answer 404. Commits."""
    rng = np.random.default_rng(11)
    user = repo.get_or_create_user(session, user_name)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    labels = {}
    for i in range(n):
        uri = f"{user_name}/{i:05d}.jpg"
        result = PhotoResult(key=uri, sha256=hashlib.sha256(uri.encode()).hexdigest(), width=320, height=240,
                             faces=[_face(vectors[i], box=(100.0, 60.0, 220.0, 180.0))])
        labels[repo.save_photo_result(session, user.id, uri, result).face_ids[0]] = i
    person_service.apply_clustering(session, user.id, labels)
    session.commit()


@dataclass
class Library:
    api: LiveApi
    token: str
    faces: dict[str, list[int]]  # LFW name -> face ids
    other_token: str  # another user's


@pytest.fixture
def library(api_db, tmp_path) -> Iterator[Library]:
    """ann: real faces of five LFW people; bob: a small synthetic library; served by a live API."""
    engine = make_engine(api_db)
    try:
        with session_factory(engine)() as session:
            faces = seed_lfw_people(session, "ann", tmp_path / "photos")
            seed_library(session, "bob", tmp_path / "photos", persons=2, faces_per_person=2, seed=2)
            _, token = tokens.create(session, "ann")
            _, other = tokens.create(session, "bob")
            session.commit()
    finally:
        engine.dispose()
    proc, api = start_api(api_db, tmp_path)
    try:
        yield Library(api, token, faces, other)
    finally:
        stop_api(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT, locale="en-US")
    context.set_default_timeout(60_000)  # generous: a busy 2-core CI machine, not a timing check
    page = context.new_page()
    page.js_errors = []
    page.on("pageerror", lambda e: page.js_errors.append(str(e)))
    try:
        yield page
    finally:
        context.close()
    assert not page.js_errors, f"uncaught errors in the page: {page.js_errors}"


# ------------------------------------------------------------------------------ page helpers


def tid(page: Page, testid: str, root=None):
    return (root or page).get_by_test_id(testid)


def text_offset(page: Page, testid: str) -> float:
    """How far (px) the middle of the element's text is from the element's own middle, across."""
    return page.get_by_test_id(testid).evaluate("""el => {
        const range = document.createRange();
        range.selectNodeContents(el);
        const text = range.getBoundingClientRect(), box = el.getBoundingClientRect();
        return (text.left + text.width / 2) - (box.left + box.width / 2);
    }""")


def sign_in(page: Page, url: str, token: str) -> None:
    page.goto(url + "/")
    expect(tid(page, "signin-view")).to_be_visible()
    tid(page, "signin-token").fill(token)
    tid(page, "signin-submit").click()
    expect(tid(page, "people-view")).to_be_visible()
    expect(tid(page, "signin-view")).to_be_hidden()


def card_ids(page: Page) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all(
        "[data-testid=person-card]", "cards => cards.map(c => c.dataset.personId)")]


def card(page: Page, person_id: int):
    return page.locator(f"[data-testid=person-card][data-person-id='{person_id}']")


def wait_images_loaded(page: Page, selector: str, count: int) -> None:
    """Every one of ``count`` images matching ``selector`` decoded with a real size."""
    page.wait_for_function(
        """([selector, count]) => {
             const imgs = [...document.querySelectorAll(selector)];
             return imgs.length === count && imgs.every(i => i.complete && i.naturalWidth > 0);
           }""", arg=[selector, count])


def wait_until(page: Page, condition: str, what: str, timeout_ms: float = 60_000) -> None:
    """Waits for the JavaScript ``condition``; a timeout says ``what`` was awaited and how the grid stood."""
    try:
        page.wait_for_function(condition, timeout=timeout_ms)
    except PlaywrightTimeout:
        state = page.evaluate("""() => ({
            url: location.href, scrollY, scrollHeight: document.documentElement.scrollHeight, innerHeight,
            cards: document.querySelectorAll('[data-testid=person-card]').length,
            noimg: document.querySelectorAll('[data-testid=person-card].noimg').length,
            withSrc: document.querySelectorAll('[data-testid=person-card] img[src]').length,
            status: document.querySelector('[data-testid=people-status]')?.textContent,
            active: document.activeElement?.outerHTML.slice(0, 120),
        })""")
        raise AssertionError(f"timed out waiting for {what}: {state}") from None


def open_person(page: Page, person_id: int) -> None:
    card(page, person_id).click()
    expect(tid(page, "person-view")).to_be_visible()
    expect(page).to_have_url(f"{page.url.split('#')[0]}#/people/{person_id}")
    expect(tid(page, "person-hide")).to_be_enabled()  # loaded: the edit buttons are enabled


def reload_person(page: Page) -> None:
    page.reload()
    expect(tid(page, "person-view")).to_be_visible()
    expect(tid(page, "person-hide")).to_be_enabled()


def go_home(page: Page) -> None:
    tid(page, "home").click()
    expect(tid(page, "people-view")).to_be_visible()


def close_toasts(page: Page) -> None:
    for button in tid(page, "toast-close").all():
        button.click()


def face_ids_shown(page: Page) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all(
        "[data-testid=face-card]", "cards => cards.map(c => c.dataset.faceId)")]


# ------------------------------------------------------------------------------ the tests


def test_sign_in_rename_merge_hide_reject_undo_sign_out(library, page, tmp_path):
    lib = library
    api = lib.api.client(lib.token)
    powell = lib.faces["Colin_Powell"]
    # One person in two, through the API: each half's top merge suggestion is the other half.
    first = api.get(f"/api/v1/faces/{powell[0]}").json()["person_id"]
    second = api.post("/api/v1/people", json={"face_ids": powell[3:]}).json()["id"]
    blair = api.get(f"/api/v1/faces/{lib.faces['Tony_Blair'][0]}").json()["person_id"]
    ann_people = {p["id"] for p in api.get("/api/v1/people", params={"hidden": "all"}).json()["items"]}
    assert len(ann_people) == 6 and {first, second, blair} <= ann_people
    bob_people = {p["id"] for p in lib.api.client(lib.other_token).get("/api/v1/people").json()["items"]}

    # Sign in by pasting the token; the grid shows ann's people (not bob's) with covers that load.
    page.goto(lib.api.url + "/")
    expect(tid(page, "signin-submit")).to_be_visible()
    assert abs(text_offset(page, "signin-submit")) < 2, "the full-width Sign in button's label is centred"
    sign_in(page, lib.api.url, lib.token)
    expect(tid(page, "person-card")).to_have_count(6)
    wait_images_loaded(page, "[data-testid=person-card] img.cover", 6)
    assert set(card_ids(page)) == ann_people and not bob_people & set(card_ids(page))
    expect(tid(page, "stats")).to_contain_text("6 people")
    page.screenshot(path=tmp_path / "people-grid.png", full_page=True)
    page.reload()  # the token is kept: still signed in, same grid
    expect(tid(page, "person-card")).to_have_count(6)
    wait_images_loaded(page, "[data-testid=person-card] img.cover", 6)
    assert set(card_ids(page)) == ann_people

    # Rename.
    open_person(page, first)
    tid(page, "person-name-input").fill("Colin Powell")
    tid(page, "person-save-name").click()
    expect(tid(page, "toast-message").last).to_have_text("Renamed to “Colin Powell”.")
    assert api.get(f"/api/v1/people/{first}").json()["name"] == "Colin Powell"
    reload_person(page)
    expect(tid(page, "person-name-input")).to_have_value("Colin Powell")
    go_home(page)
    expect(card(page, first).get_by_test_id("person-card-name")).to_have_text("Colin Powell")
    page.reload()
    expect(card(page, first).get_by_test_id("person-card-name")).to_have_text("Colin Powell")

    # Merge through the suggestion panel: the top suggestion is the other half.
    open_person(page, first)
    suggestions = tid(page, "merge-suggestion")
    expect(suggestions.first).to_have_attribute("data-person-id", str(second))
    wait_images_loaded(page, "[data-testid=merge-suggestion] img.cover", suggestions.count())
    suggestions.first.get_by_test_id("merge-accept").click()
    expect(tid(page, "toast-message").last).to_have_text("Merged 2 people (3 faces joined).")
    expect(tid(page, "face-card")).to_have_count(6)
    expect(tid(page, "person-face-count")).to_contain_text("6 faces")
    expect(page.locator(f"[data-testid=merge-suggestion][data-person-id='{second}']")).to_have_count(0)
    assert api.get(f"/api/v1/people/{second}").status_code == 404
    assert api.get(f"/api/v1/people/{first}").json()["face_count"] == 6
    reload_person(page)
    expect(tid(page, "face-card")).to_have_count(6)
    assert sorted(face_ids_shown(page)) == sorted(powell)
    expect(tid(page, "person-name-input")).to_have_value("Colin Powell")
    wait_images_loaded(page, "[data-testid=face-card] img", 6)
    wait_images_loaded(page, "[data-testid=person-cover]", 1)
    close_toasts(page)
    page.screenshot(path=tmp_path / "person-page.png", full_page=True)
    go_home(page)
    expect(tid(page, "person-card")).to_have_count(5)
    expect(card(page, second)).to_have_count(0)

    # Hide: gone from the grid unless "show hidden".
    open_person(page, blair)
    tid(page, "person-hide").click()
    expect(tid(page, "person-hide")).to_have_text("Unhide")
    assert api.get(f"/api/v1/people/{blair}").json()["hidden"] is True
    reload_person(page)
    expect(tid(page, "person-hide")).to_have_text("Unhide")
    go_home(page)
    expect(tid(page, "person-card")).to_have_count(4)
    expect(card(page, blair)).to_have_count(0)
    page.reload()
    expect(tid(page, "person-card")).to_have_count(4)
    expect(card(page, blair)).to_have_count(0)
    tid(page, "show-hidden").check()
    expect(tid(page, "person-card")).to_have_count(5)
    expect(card(page, blair)).to_contain_text("Hidden")
    tid(page, "show-hidden").uncheck()
    expect(tid(page, "person-card")).to_have_count(4)

    # "Not this person" on a face: it leaves the person and is in no person.
    open_person(page, first)
    expect(tid(page, "face-card")).to_have_count(6)
    rejected = powell[1]
    face = page.locator(f"[data-testid=face-card][data-face-id='{rejected}']")
    face.click()
    expect(face).to_have_attribute("aria-pressed", "true")
    expect(tid(page, "selection-count")).to_have_text("1 face selected")
    tid(page, "not-this-person").click()
    expect(tid(page, "toast-message").last).to_have_text("Removed 1 face from Colin Powell.")
    expect(tid(page, "face-card")).to_have_count(5)
    expect(face).to_have_count(0)
    expect(tid(page, "person-face-count")).to_contain_text("5 faces")
    assert api.get(f"/api/v1/faces/{rejected}").json()["person_id"] is None
    assert api.get(f"/api/v1/people/{first}").json()["face_count"] == 5
    reload_person(page)
    expect(tid(page, "face-card")).to_have_count(5)
    assert rejected not in face_ids_shown(page)

    # Undo (the top bar's button) reverts the last edit, the rejection, and nothing before it.
    close_toasts(page)
    tid(page, "undo").click()
    expect(tid(page, "toast-message").last).to_contain_text("Undone")
    expect(tid(page, "face-card")).to_have_count(6)
    expect(face).to_have_count(1)
    assert api.get(f"/api/v1/faces/{rejected}").json()["person_id"] == first
    person = api.get(f"/api/v1/people/{first}").json()
    assert (person["face_count"], person["name"]) == (6, "Colin Powell")
    assert api.get(f"/api/v1/people/{blair}").json()["hidden"] is True
    assert api.get(f"/api/v1/people/{second}").status_code == 404
    edits = api.get("/api/v1/edits").json()
    assert edits[0]["kind"] == "reject" and edits[0]["undone"] and not edits[1]["undone"]
    tid(page, "edits-toggle").click()
    expect(tid(page, "edit-item").first).to_have_class("edit undone")
    reload_person(page)
    expect(tid(page, "face-card")).to_have_count(6)
    assert sorted(face_ids_shown(page)) == sorted(powell)

    # Sign out: back to the sign-in form, and a reload does not sign in again.
    tid(page, "signout").click()
    expect(tid(page, "signin-view")).to_be_visible()
    expect(tid(page, "signin-message")).to_have_text("You signed out.")
    expect(tid(page, "person-view")).to_be_hidden()
    expect(tid(page, "people-view")).to_be_hidden()
    page.reload()
    expect(tid(page, "signin-view")).to_be_visible()
    expect(tid(page, "signout")).to_be_hidden()
    assert page.evaluate("localStorage.getItem('facecluster.token')") is None


@pytest.fixture
def many_people(sqlite_template, tmp_path) -> Iterator[tuple[LiveApi, str]]:
    """A user with :data:`MANY` persons of one face each (no photo files), served by a live API."""
    path = tmp_path / "many.db"
    shutil.copyfile(sqlite_template, path)
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            seed_many_people(session, "many", MANY)
            _, token = tokens.create(session, "many")
            session.commit()
    finally:
        engine.dispose()
    proc, api = start_api(url, tmp_path)
    try:
        yield api, token
    finally:
        stop_api(proc)


AT_BOTTOM = "() => innerHeight + scrollY >= document.documentElement.scrollHeight - 2"
LONG_TASKS = """
window.__longTasks = [];
new PerformanceObserver((list) => { for (const e of list.getEntries()) window.__longTasks.push(e.duration); })
  .observe({type: 'longtask', buffered: true});
"""


def test_2000_people_scroll_to_the_end(many_people, page, tmp_path, record_property):
    api, token = many_people
    everyone, cursor = set(), None
    with api.client(token) as client:
        while True:
            got = client.get("/api/v1/people", params={"limit": 500, **({"cursor": cursor} if cursor else {})}).json()
            everyone |= {p["id"] for p in got["items"]}
            if not (cursor := got["next_cursor"]):
                break
    assert len(everyone) == MANY

    pages = []  # the cursor of every page of people the page asked for
    page.on("request", lambda r: pages.append(parse_qs(urlsplit(r.url).query).get("cursor", [None])[0])
            if urlsplit(r.url).path == "/api/v1/people" else None)
    page.add_init_script(LONG_TASKS)
    sign_in(page, api.url, token)
    expect(tid(page, "person-card").nth(99)).to_be_attached()
    page.evaluate("document.activeElement?.blur()")

    # Down to the end with the mouse wheel: the sentinel pulls in page after page.
    page.mouse.move(VIEWPORT["width"] / 2, VIEWPORT["height"] / 2)
    started, deadline, wheels = time.perf_counter(), time.monotonic() + 120, 0
    while True:
        page.mouse.wheel(0, 4800)
        wheels += 1
        state = page.evaluate(f"""() => ({{
            cards: document.querySelectorAll('[data-testid=person-card]').length,
            status: document.querySelector('[data-testid=people-status]').textContent,
            bottom: ({AT_BOTTOM})(),
        }})""")
        if state["cards"] == MANY and state["bottom"] and state["status"] == "2,000 people.":
            break
        assert time.monotonic() < deadline, f"did not reach the end of the grid: {state}"
    wheel_s = time.perf_counter() - started

    shown = card_ids(page)
    assert len(shown) == MANY and set(shown) == everyone, "every person once, none missing"
    expect(tid(page, "person-card").last).to_be_in_viewport()
    assert pages[0] is None and len(pages) == len(set(pages)) == MANY // 100, f"cursor paging: {pages}"
    # The last cards' covers answer 404 (no photo files): a placeholder, not a broken image or an error.
    wait_until(page, "() => document.querySelector('[data-testid=person-card]:last-child').classList.contains('noimg')",
               "the last card's placeholder")
    expect(page.locator(".toast.error")).to_have_count(0)
    page.screenshot(path=tmp_path / "people-grid-2000.png")

    # The keyboard goes all the way up and down again.
    page.keyboard.press("Home")
    wait_until(page, "() => scrollY === 0", "Home to scroll to the top")
    started = time.perf_counter()
    page.keyboard.press("End")
    wait_until(page, AT_BOTTOM, "End to scroll to the bottom")
    end_key_s = time.perf_counter() - started

    frame_ms = page.evaluate("""() => new Promise((resolve) => {
        const t = performance.now();
        requestAnimationFrame(() => requestAnimationFrame(() => resolve(performance.now() - t)));
    })""")
    nodes = page.evaluate("document.getElementsByTagName('*').length")
    long_tasks = page.evaluate("window.__longTasks")

    # Still responsive: the last person opens, and Back returns to the same place in the same grid.
    last = shown[-1]
    card(page, last).click()
    expect(tid(page, "person-view")).to_be_visible()
    expect(tid(page, "face-card")).to_have_count(1)
    wait_until(page, "() => document.querySelector('[data-testid=person-cover]').classList.contains('noimg')",
               "the person's cover placeholder")
    page.go_back()
    expect(tid(page, "people-view")).to_be_visible()
    wait_until(page, AT_BOTTOM, "Back to return to the bottom of the grid")
    assert len(card_ids(page)) == MANY and len(pages) == MANY // 100, "the grid was kept, not loaded again"

    report = {"wheel_to_end_s": round(wheel_s, 2), "wheel_steps": wheels, "end_key_s": round(end_key_s, 3),
              "two_frames_ms": round(frame_ms, 1), "dom_elements": nodes, "long_tasks": len(long_tasks),
              "longest_task_ms": round(max(long_tasks, default=0), 1)}
    for key, value in report.items():
        record_property(key, value)
    print(f"\n{MANY} people: {report}")
