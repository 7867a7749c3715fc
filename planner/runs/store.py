"""The run store: one SQLite file that remembers every run, instance, event and dollar.

Why SQLite: it is embedded (no server), survives a `kill -9` of the launcher (every write is its own
committed transaction) and is what `ftplan gc` reads to find instances nobody is looking after.

Money-safety contract (see `ftplan.planner.launch.launcher`):
  1. `add_instance_intent` is written *before* the provider's create call,
  2. `set_instance_created` right after it returned an id,
  3. `set_instance_terminated` only after `terminate` returned (confirmed),
so any instance row not in a final state is a candidate for `ftplan gc`.

Schema changes are ordered, named migrations recorded in `schema_migrations` (sqlite-utils style);
opening a store applies the missing ones in one transaction each.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftplan.planner.errors import UserError

# Run statuses. The first group is final; anything else means "a launcher is (or was) working on it".
FINAL_STATUSES = ("succeeded", "failed", "stopped_over_budget", "cancelled")
LIVE_STATUSES = ("planned", "provisioning", "starting", "training", "pulling", "recovering", "tearing_down")

# Instance row states. `terminated` and `create_failed` are final (nothing bills); a preempted instance
# is `lost` until a terminate call (idempotent) confirms it is gone.
INSTANCE_FINAL = ("terminated", "create_failed")
INSTANCE_OPEN = ("intent", "created", "ready", "terminating", "lost")


def _m1_core(db: sqlite3.Connection) -> None:
    db.executescript(
        """
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            finished_at REAL,
            status TEXT NOT NULL,
            phase TEXT,
            model TEXT, method TEXT, provider TEXT, instance_type TEXT, gpu TEXT, gpu_count INTEGER,
            region TEXT, spot INTEGER, price_hour REAL,
            budget_usd REAL,
            est_hours REAL, est_usd REAL, est_peak_mem_gib REAL, est_tokens_per_s REAL,
            actual_hours REAL, actual_usd REAL,
            artifacts_dir TEXT,
            error TEXT,
            config_json TEXT,
            summary_json TEXT
        );
        CREATE TABLE instances (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs(id),
            provider TEXT NOT NULL,
            instance_type TEXT, gpu TEXT, region TEXT, zone TEXT, spot INTEGER, price_hour REAL,
            provider_instance_id TEXT,
            instance_json TEXT,
            state TEXT NOT NULL,
            intent_at REAL NOT NULL,
            created_at REAL, ready_at REAL, terminated_at REAL,
            error TEXT
        );
        CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            phase TEXT,
            message TEXT,
            data_json TEXT
        );
        CREATE TABLE costs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL,
            instance_row INTEGER REFERENCES instances(id),
            started_at REAL NOT NULL,
            ended_at REAL NOT NULL,
            price_hour REAL NOT NULL,
            hours REAL NOT NULL,
            usd REAL NOT NULL
        );
        CREATE INDEX events_run ON events(run_id, ts);
        CREATE INDEX instances_state ON instances(state);
        """
    )


def _m2_launcher_and_measurements(db: sqlite3.Connection) -> None:
    """Who is driving a run (so gc can tell a live launcher from a killed one) and what it measured
    (so `ftplan.planner.runs.corrections` can correct later estimates)."""
    db.executescript(
        """
        ALTER TABLE runs ADD COLUMN launcher_pid INTEGER;
        ALTER TABLE runs ADD COLUMN launcher_host TEXT;
        ALTER TABLE runs ADD COLUMN measured_tokens_per_s REAL;
        ALTER TABLE runs ADD COLUMN measured_peak_mem_gib REAL;
        ALTER TABLE runs ADD COLUMN provider_options_json TEXT;
        CREATE INDEX runs_measured ON runs(gpu, model, method);
        """
    )


def _m3_store_identity(db: sqlite3.Connection) -> None:
    """A random id made once per store: every instance is tagged with it, so `ftplan gc` can tell its own
    instances from those of a colleague's store (or a CI job's) on the same cloud account."""
    import secrets

    db.execute("CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute(f"INSERT INTO store_meta VALUES ('store_id', 'st{secrets.token_hex(6)}')")


def _m4_cost_clock(db: sqlite3.Connection) -> None:
    """Which clock a cost row was billed from (issue 14): "provider" (its launch and end times), "provider start",
    "provider end", "watchdog" (the machine's power-off) or "launcher" (rows before m4: NULL, the launcher's)."""
    db.executescript("ALTER TABLE costs ADD COLUMN clock TEXT;")


MIGRATIONS: list[tuple[int, str, Any]] = [
    (1, "core tables: runs, instances, events, costs", _m1_core),
    (2, "launcher identity and measured throughput", _m2_launcher_and_measurements),
    (3, "store identity (the owner tag of every instance)", _m3_store_identity),
    (4, "the clock each cost row was billed from", _m4_cost_clock),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def default_store_path() -> Path:
    """`$FTPLAN_STORE`, else `<user data dir>/ftplan/runs.sqlite3`."""
    env = os.environ.get("FTPLAN_STORE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("ftplan")) / "runs.sqlite3"


@dataclass
class Row:
    """A read-only view of a table row with attribute access."""

    data: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None

    def json(self, column: str) -> Any:
        raw = self.data.get(column)
        return json.loads(raw) if raw else None


class Store:
    """Thin, explicit access to the run store. Every method commits before it returns."""

    def __init__(self, path: str | Path | None = None, *, migrate_to: int | None = None):
        self.path = Path(path) if path else default_store_path()
        hint = "pass --store FILE or set FTPLAN_STORE"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise UserError(f"cannot open the run store {self.path}: {exc}; {hint}") from None
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA busy_timeout=30000")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate(SCHEMA_VERSION if migrate_to is None else migrate_to)
        except sqlite3.DatabaseError as exc:
            self.db.close()
            if _unwritable(self.path, exc):
                raise UserError(f"cannot write the run store {self.path}: the file or its folder is read-only "
                                f"({exc}); make it writable, or {hint} with a writable path") from None
            raise UserError(f"{self.path} is not an ftplan run store ({exc}); pass --store FILE with another path") from None

    # ---- schema -------------------------------------------------------------------------------
    def _migrate(self, target: int) -> None:
        """Each migration in its own write transaction, the version read *inside* it: several processes
        opening a fresh store at once queue on the write lock and each applies only what is still missing."""
        have = self._version_if_any()
        if have >= target:
            self._check_not_newer(have)
            return
        for version, name, apply in MIGRATIONS:
            if version > target:
                break
            with self.transaction():
                self.db.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                                "(version INTEGER PRIMARY KEY, name TEXT, applied_at REAL)")
                have = self.schema_version()
                self._check_not_newer(have)
                if have >= version:
                    continue
                apply_in_tx(self.db, apply)
                self.db.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, time.time()))

    def _version_if_any(self) -> int:
        """The schema version without writing anything (0 for an empty file)."""
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_migrations'").fetchone():
            return 0
        return self.schema_version()

    def _check_not_newer(self, have: int) -> None:
        if have > SCHEMA_VERSION:
            raise UserError(
                f"the run store {self.path} has schema version {have}, newer than this ftplan ({SCHEMA_VERSION}); "
                "upgrade ftplan or pass --store with another file"
            )

    @property
    def store_id(self) -> str:
        """This store's identity, the owner tag its launches put on every instance ("" before migration 3)."""
        try:
            row = self.db.execute("SELECT value FROM store_meta WHERE key = 'store_id'").fetchone()
        except sqlite3.OperationalError:
            return ""
        return row[0] if row else ""

    def schema_version(self) -> int:
        row = self.db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # ---- runs ---------------------------------------------------------------------------------
    def create_run(self, run_id: str, **fields: Any) -> None:
        now = time.time()
        fields = _encode(fields)
        fields.setdefault("status", "planned")
        fields.update(id=run_id, created_at=now, updated_at=now,
                      launcher_pid=os.getpid(), launcher_host=socket.gethostname())
        cols = ", ".join(fields)
        self.db.execute(f"INSERT INTO runs ({cols}) VALUES ({', '.join('?' * len(fields))})", list(fields.values()))

    def update_run(self, run_id: str, **fields: Any) -> None:
        fields = _encode({k: (scrub_data(v) if k in _SCRUBBED_RUN_FIELDS else v) for k, v in fields.items()})
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE runs SET {sets} WHERE id = ?", [*fields.values(), run_id])

    def finish_run(self, run_id: str, status: str, **fields: Any) -> None:
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final status: {status}")
        self.update_run(run_id, status=status, finished_at=time.time(), phase="done", **fields)

    def get_run(self, run_id: str) -> Row | None:
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:  # allow a unique prefix, as users type short ids
            rows = self.db.execute("SELECT * FROM runs WHERE id LIKE ?", (run_id + "%",)).fetchall()
            row = rows[0] if len(rows) == 1 else None
        return Row(dict(row)) if row else None

    def has_run(self, run_id: str | None) -> bool:
        """Exactly this run id (no prefix matching) is recorded here."""
        return bool(run_id) and self.db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is not None

    def list_runs(self, limit: int | None = None) -> list[Row]:
        sql = "SELECT * FROM runs ORDER BY created_at DESC"
        params: tuple = ()
        if limit:
            sql += " LIMIT ?"
            params = (limit,)
        return [Row(dict(r)) for r in self.db.execute(sql, params)]

    # ---- instances ----------------------------------------------------------------------------
    def add_instance_intent(self, run_id: str, provider: str, **fields: Any) -> int:
        """Written before `Provider.create`: if the launcher dies inside the call, gc still knows to look."""
        fields = _encode(fields)
        fields.update(run_id=run_id, provider=provider, state="intent", intent_at=time.time())
        cols = ", ".join(fields)
        cur = self.db.execute(
            f"INSERT INTO instances ({cols}) VALUES ({', '.join('?' * len(fields))})", list(fields.values())
        )
        return int(cur.lastrowid)

    def set_instance_created(self, row_id: int, instance_id: str, instance: dict[str, Any]) -> None:
        self.db.execute(
            "UPDATE instances SET state='created', provider_instance_id=?, instance_json=?, created_at=? WHERE id=?",
            (instance_id, json.dumps(instance), time.time(), row_id),
        )

    def set_instance_state(self, row_id: int, state: str, *, error: str | None = None,
                           instance: dict[str, Any] | None = None) -> None:
        ts_col = {"ready": "ready_at", "terminated": "terminated_at", "create_failed": "terminated_at"}.get(state)
        sets = ["state = ?"]
        params: list[Any] = [state]
        if ts_col:
            sets.append(f"{ts_col} = ?")
            params.append(time.time())
        if error is not None:
            sets.append("error = ?")
            params.append(error)
        if instance is not None:
            sets.append("instance_json = ?")
            params.append(json.dumps(instance))
        self.db.execute(f"UPDATE instances SET {', '.join(sets)} WHERE id = ?", [*params, row_id])

    def set_instance_terminated(self, row_id: int) -> None:
        """Only after the provider confirmed: this is what closes the money leak."""
        self.set_instance_state(row_id, "terminated")

    def get_instance(self, row_id: int) -> Row:
        return Row(dict(self.db.execute("SELECT * FROM instances WHERE id = ?", (row_id,)).fetchone()))

    def instances(self, run_id: str | None = None, *, open_only: bool = False) -> list[Row]:
        sql, params = "SELECT * FROM instances WHERE 1=1", []
        if run_id:
            sql += " AND run_id = ?"
            params.append(run_id)
        if open_only:
            sql += f" AND state IN ({', '.join('?' * len(INSTANCE_OPEN))})"
            params.extend(INSTANCE_OPEN)
        return [Row(dict(r)) for r in self.db.execute(sql + " ORDER BY id", params)]

    # ---- events and costs ---------------------------------------------------------------------
    def add_event(self, run_id: str, kind: str, message: str = "", *, phase: str | None = None,
                  data: dict[str, Any] | None = None) -> None:
        self.db.execute(
            "INSERT INTO events (run_id, ts, kind, phase, message, data_json) VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, time.time(), kind, phase, scrub_data(message or ""),
             json.dumps(scrub_data(data)) if data is not None else None),
        )

    def events(self, run_id: str, kind: str | None = None) -> list[Row]:
        sql, params = "SELECT * FROM events WHERE run_id = ?", [run_id]
        if kind:
            sql += " AND kind = ?"
            params.append(kind)
        return [Row(dict(r)) for r in self.db.execute(sql + " ORDER BY ts, id", params)]

    def add_cost(self, run_id: str, instance_row: int | None, started_at: float, ended_at: float,
                 price_hour: float, *, clock: str | None = None, billed_hours: float | None = None) -> float:
        """One billed span. `billed_hours`: what the provider charges for it (granularity, minimum) when known,
        else the span itself; `clock`: whose times these are (see `_m4_cost_clock`)."""
        hours = max(0.0, ended_at - started_at) / 3600.0 if billed_hours is None else max(0.0, billed_hours)
        usd = hours * price_hour
        self.db.execute(
            "INSERT INTO costs (run_id, instance_row, started_at, ended_at, price_hour, hours, usd, clock)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, instance_row, started_at, ended_at, price_hour, hours, usd, clock or "launcher"),
        )
        return usd

    def costs(self, run_id: str | None = None) -> list[Row]:
        sql, params = "SELECT * FROM costs", []
        if run_id:
            sql += " WHERE run_id = ?"
            params.append(run_id)
        return [Row(dict(r)) for r in self.db.execute(sql + " ORDER BY started_at", params)]

    def run_cost(self, run_id: str) -> tuple[float, float]:
        """(hours, usd) billed so far for a run, over all its instances."""
        row = self.db.execute(
            "SELECT COALESCE(SUM(hours), 0), COALESCE(SUM(usd), 0) FROM costs WHERE run_id = ?", (run_id,)
        ).fetchone()
        return float(row[0]), float(row[1])


def apply_in_tx(db: sqlite3.Connection, apply: Any) -> None:
    """Run a migration inside the caller's transaction. `executescript` would COMMIT first, so split it."""
    recorder = _StatementRecorder()
    apply(recorder)
    for stmt in recorder.statements:
        db.execute(stmt)


class _StatementRecorder:
    """Collects the statements of a migration's `executescript` so they run inside one transaction."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def executescript(self, script: str) -> None:
        buf = ""
        for line in script.splitlines(keepends=True):
            buf += line
            if sqlite3.complete_statement(buf):
                if buf.strip():
                    self.statements.append(buf.strip())
                buf = ""
        if buf.strip():
            raise ValueError(f"incomplete SQL statement in migration: {buf.strip()}")

    def execute(self, stmt: str) -> None:
        self.statements.append(stmt)


# Run fields that can carry text from the machine or a provider: scrubbed of secrets before they are stored.
_SCRUBBED_RUN_FIELDS = ("error", "summary_json", "phase")


def scrub_data(value: Any) -> Any:
    """`value` with every registered secret removed from every string in it (dicts and lists walked;
    numbers, booleans and None kept). Whatever comes back from a machine passes through here first."""
    from ftplan.providers.errors import scrub

    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(k) if isinstance(k, str) else k: scrub_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_data(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return scrub(value)


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in fields.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        elif isinstance(value, bool):
            value = int(value)
        elif isinstance(value, Path):
            value = str(value)
        out[key] = value
    return out


def _unwritable(path: Path, exc: Exception) -> bool:
    text = str(exc).lower()
    return "readonly" in text or "read-only" in text or "unable to open" in text or not os.access(
        path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK))


def pid_alive(pid: int | None, host: str | None) -> bool:
    """Is the launcher that owns a run still alive? Only decidable on the same host; elsewhere assume yes."""
    if not pid:
        return False
    if host and host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed child not yet reaped) is dead for our purposes.
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
