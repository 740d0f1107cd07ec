"""Tracking without importing MLflow: a stage's runs written straight into MLflow's sqlite store.

Importing MLflow and opening its store costs a process about 4 s of CPU, more than the main
job computes, and on a two-core machine that CPU is taken from the stage. On a local sqlite
store that MLflow has already created, the few rows a stage writes (a run, its tags, params
and metrics, its end) are written here with the standard library's ``sqlite3``, in MLflow's
own schema and with MLflow's rules, and artifacts are copied where MLflow's local artifact
repository puts them. The MLflow UI, ``MlflowClient`` and ``search_runs`` read these runs like
any other (``tests/test_tracking_background.py`` compares them with runs MLflow wrote).

It is used only when :func:`unusable` finds nothing against it: the store exists, its schema
revision is one this module was checked against (:data:`KNOWN_SCHEMAS`), the experiment exists
with a local artifact location, and no MLflow feature that changes what a run looks like
(workspaces, stored credentials) is on. Otherwise MLflow writes (see :mod:`pipelines.tracking`).
"""

from __future__ import annotations

import contextlib
import getpass
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from irene.data.io import atomic_write_bytes

# MLflow's alembic revisions whose tables runs, tags, params, metrics and latest_metrics this
# module writes as MLflow does (checked with MLflow 3.17, whose head this is). A store of
# another revision is written by MLflow itself.
KNOWN_SCHEMAS = frozenset({"dc11669786a5"})

# MLflow's limits (mlflow.utils.validation) and its stand-ins for values sqlite cannot hold
MAX_KEY_LENGTH, MAX_PARAM_LENGTH, MAX_TAG_LENGTH = 250, 6000, 8000
_FLOAT_MAX = 1.7976931348623157e308
_BUSY_TIMEOUT_S = 60.0


class DirectWriteError(Exception):
    """A write was refused (as MLflow refuses it) or sqlite failed."""


def store_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other store)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def _local_folder(location: str | None) -> Path | None:
    """The folder of a local artifact location (``file:`` URI or absolute path), else None."""
    if not location:
        return None
    parsed = urlparse(location)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and Path(location).is_absolute():
        return Path(location)
    return None


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    connection.execute("PRAGMA foreign_keys = ON")
    return connection


def unusable(uri: str, experiment: str) -> str | None:
    """Why this module should not write to ``uri``'s ``experiment`` (None: it can)."""
    path = store_path(uri)
    if path is None:
        return "not a sqlite store"
    if not path.is_file() or path.stat().st_size == 0:
        return "the store does not exist yet (MLflow creates it)"
    if os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").lower() in ("1", "true") or os.environ.get(
            "MLFLOW_WORKSPACE"):
        return "MLflow workspaces are on"
    if (Path.home() / ".mlflow" / "credentials").exists():
        return "MLflow credentials are stored (they name the run's user)"
    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(path.absolute()))}?mode=ro", uri=True,
                                                timeout=_BUSY_TIMEOUT_S)) as connection:
            revision = connection.execute("SELECT version_num FROM alembic_version").fetchone()
            if revision is None or revision[0] not in KNOWN_SCHEMAS:
                return f"schema revision {revision and revision[0]} is not one of {sorted(KNOWN_SCHEMAS)}"
            found = _experiment(connection, experiment)
    except sqlite3.Error as error:
        return f"cannot read the store: {error}"
    if found is None:
        return f"experiment {experiment!r} does not exist yet (MLflow creates it)"
    if _local_folder(found[1]) is None:
        return f"artifact location {found[1]!r} is not a local folder"
    return None


def _experiment(connection: sqlite3.Connection, name: str) -> tuple[int, str] | None:
    """(id, artifact location) of the active experiment ``name`` of the default workspace."""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(experiments)")}
    where = " AND workspace = 'default'" if "workspace" in columns else ""
    return connection.execute(
        f"SELECT experiment_id, artifact_location FROM experiments WHERE name = ? "
        f"AND lifecycle_stage = 'active'{where}", (name,)).fetchone()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check_key(kind: str, key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH:
        raise DirectWriteError(f"{kind} key {key[:60]!r} must be 1 to {MAX_KEY_LENGTH} characters")


def _git(folder: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.decode("utf-8", "replace").strip()
    return text if out.returncode == 0 and text else None


def source_tags(argv: list[str]) -> dict[str, str]:
    """The tags MLflow's run context gives a run started by ``argv`` (user, source, git)."""
    main = argv[0] if argv and argv[0] else None
    tags = {"mlflow.user": os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser(),
            "mlflow.source.name": main or "<console>", "mlflow.source.type": "LOCAL"}
    if main is not None:
        folder = Path(main).absolute().parent
        commit = _git(folder, "rev-parse", "HEAD")
        if commit is not None:
            tags["mlflow.source.git.commit"] = commit
            for key, args in (("mlflow.source.git.branch", ("symbolic-ref", "--short", "-q", "HEAD")),
                              ("mlflow.source.git.repoURL", ("remote", "get-url", "origin"))):
                value = _git(folder, *args)
                if value is not None:
                    tags[key] = value
    return tags


class SqliteTracker:
    """The tracker interface of :mod:`pipelines.tracking` (nested runs in order), writing each
    call at once in a transaction of its own."""

    def __init__(self, uri: str, experiment: str):
        self.uri = uri
        self.connection = _connect(store_path(uri))
        found = _experiment(self.connection, experiment)
        if found is None:
            raise DirectWriteError(f"experiment {experiment!r} is gone")
        self.experiment_id, self.location = found
        self.artifact_root = _local_folder(self.location)
        if self.artifact_root is None:
            raise DirectWriteError(f"artifact location {self.location!r} is not a local folder")
        self.depth = 0
        self.run_ids: list[str] = []  # of every run started, in order
        self._open: list[str] = []  # the runs open now, innermost last
        self._source = source_tags(sys.argv)

    @property
    def num_started(self) -> int:
        return len(self.run_ids)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction; the database is locked for writing from its start."""
        try:
            self.connection.execute("BEGIN IMMEDIATE")
            try:
                yield self.connection
            except BaseException:
                self.connection.execute("ROLLBACK")
                raise
            self.connection.execute("COMMIT")
        except sqlite3.Error as error:
            raise DirectWriteError(f"sqlite: {error}") from error

    def _artifacts(self, run_id: str) -> Path:
        return self.artifact_root / run_id / "artifacts"

    # ------------------------------------------------------------------------- the interface
    def start(self, name: str, tags: dict[str, str], nested: bool, params: dict[str, str],
              config_yaml: str | None) -> None:
        run_id = uuid.uuid4().hex
        all_tags = dict(self._source)
        if nested and self._open:
            all_tags["mlflow.parentRunId"] = self._open[-1]
        all_tags.update(tags)
        all_tags["mlflow.runName"] = name
        artifact_uri = f"{self.location.rstrip('/')}/{run_id}/artifacts"  # as MLflow's
        with self._write() as db:
            db.execute(
                "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, "
                "user_id, status, start_time, end_time, deleted_time, source_version, "
                "lifecycle_stage, artifact_uri, experiment_id) "
                "VALUES (?, ?, 'UNKNOWN', '', '', ?, 'RUNNING', ?, NULL, NULL, '', 'active', ?, ?)",
                (run_id, name, all_tags["mlflow.user"], _now_ms(), artifact_uri,
                 self.experiment_id))
            self._insert_tags(db, run_id, all_tags)
        self.run_ids.append(run_id)
        self._open.append(run_id)
        self.depth += 1
        try:
            if params:
                self.log_params(params)
            if config_yaml is not None:
                atomic_write_bytes(self._artifacts(run_id) / "config.yaml",
                                   config_yaml.encode("utf-8"))
        except BaseException:
            self.end("FAILED")
            raise

    def end(self, status: str) -> None:
        run_id = self._open.pop()
        self.depth -= 1
        with self._write() as db:
            db.execute("UPDATE runs SET status = ?, end_time = ? WHERE run_uuid = ?",
                       (status, _now_ms(), run_id))

    def log_params(self, params: dict[str, str]) -> None:
        run_id = self._open[-1]
        for key, value in params.items():
            _check_key("param", key)
            if len(value) > MAX_PARAM_LENGTH:
                raise DirectWriteError(f"param {key!r}: value of {len(value)} characters, "
                                       f"more than MLflow's {MAX_PARAM_LENGTH}")
        with self._write() as db:
            existing = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?",
                                       (run_id,)))
            changed = [k for k, v in params.items() if k in existing and existing[k] != v]
            if changed:
                raise DirectWriteError(
                    f"changing param values is not allowed: {changed[0]!r} was "
                    f"{existing[changed[0]]!r}, now {params[changed[0]]!r} (run {run_id})")
            db.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)",
                           [(k, v, run_id) for k, v in params.items() if k not in existing])

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        run_id, timestamp, step = self._open[-1], _now_ms(), step or 0
        rows = []
        for key, value in metrics.items():
            _check_key("metric", key)
            value = float(value)
            is_nan = math.isnan(value)
            stored = 0.0 if is_nan else max(-_FLOAT_MAX, min(_FLOAT_MAX, value))
            rows.append((key, stored, timestamp, step, int(is_nan)))
        with self._write() as db:
            db.executemany("INSERT OR IGNORE INTO metrics (key, value, timestamp, run_uuid, "
                           "step, is_nan) VALUES (?, ?, ?, ?, ?, ?)",
                           [(k, v, t, run_id, s, n) for k, v, t, s, n in rows])
            for key, value, timestamp, step, is_nan in rows:
                latest = db.execute("SELECT step, timestamp, value FROM latest_metrics "
                                    "WHERE run_uuid = ? AND key = ?", (run_id, key)).fetchone()
                if latest is None:
                    db.execute("INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, "
                               "run_uuid) VALUES (?, ?, ?, ?, ?, ?)",
                               (key, value, timestamp, step, is_nan, run_id))
                elif (step, timestamp, value) > tuple(latest):
                    db.execute("UPDATE latest_metrics SET value = ?, timestamp = ?, step = ?, "
                               "is_nan = ? WHERE run_uuid = ? AND key = ?",
                               (value, timestamp, step, is_nan, run_id, key))

    def set_tags(self, tags: dict[str, str]) -> None:
        run_id = self._open[-1]
        with self._write() as db:
            self._insert_tags(db, run_id, tags)
            if "mlflow.runName" in tags:
                db.execute("UPDATE runs SET name = ? WHERE run_uuid = ?",
                           (tags["mlflow.runName"][:MAX_TAG_LENGTH], run_id))

    @staticmethod
    def _insert_tags(db: sqlite3.Connection, run_id: str, tags: dict[str, str]) -> None:
        for key in tags:
            _check_key("tag", key)
        db.executemany("INSERT OR REPLACE INTO tags (key, value, run_uuid) VALUES (?, ?, ?)",
                       [(k, str(v)[:MAX_TAG_LENGTH], run_id) for k, v in tags.items()])

    def log_artifact(self, path: str, artifact_path: str | None) -> None:
        """A file, or a folder's files, under the run's artifact folder, where MLflow's local
        artifact repository puts them (a file through a temporary name: never seen half)."""
        source = Path(path)
        folder = self._artifacts(self._open[-1])
        if source.is_dir():
            shutil.copytree(source, folder / (artifact_path or source.name), dirs_exist_ok=True)
        else:
            atomic_write_bytes(folder / (artifact_path or "") / source.name, source.read_bytes())

    def started(self, index: int) -> str:
        """The id of the ``index``-th run started."""
        return self.run_ids[index]

    def running_runs(self) -> list[tuple[str, dict[str, str]]]:
        """(id, tags) of the experiment's runs that are RUNNING, for the stale-run check."""
        found = self.connection.execute(
            "SELECT run_uuid FROM runs WHERE experiment_id = ? AND status = 'RUNNING' "
            "AND lifecycle_stage = 'active'", (self.experiment_id,)).fetchall()
        return [(run_id, dict(self.connection.execute(
            "SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)))) for run_id, in found]

    def close_run(self, run_id: str, tags: dict[str, str], status: str) -> None:
        """Tag and end a run of the experiment that is not this tracker's (a stale one)."""
        with self._write() as db:
            self._insert_tags(db, run_id, tags)
            db.execute("UPDATE runs SET status = ?, end_time = ? WHERE run_uuid = ?",
                       (status, _now_ms(), run_id))

    def close(self) -> None:
        self.connection.close()
