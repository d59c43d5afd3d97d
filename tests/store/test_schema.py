"""Opening the store: file, pragmas, migrations, locks, retention."""

import sqlite3
import threading

import pytest
import sqlalchemy as sa

from manager import store_schema
from manager.errors import StoreError
from manager.events import Retention
from manager.store import DB_FILE_NAME, Store, TaskUpdate
from manager.store_schema import MIGRATIONS, Migration, migrate


def sent_at(task_id, at):
    return TaskUpdate(task_id=task_id, state="PENDING", state_at=at,
                      state_rank=0, name="t", sent=at)


@pytest.fixture
def path(tmp_path):
    return tmp_path / DB_FILE_NAME


def test_the_default_database_is_a_file_in_the_state_directory(tmp_path):
    folder = tmp_path / "state" / "nested"
    with Store(state_dir=folder) as store:
        assert store.url == f"sqlite:///{folder / DB_FILE_NAME}"
        assert (folder / DB_FILE_NAME).exists()


def test_the_state_directory_comes_from_the_environment(tmp_path,
                                                         monkeypatch):
    monkeypatch.setenv("CMPOLICY_STATE_DIR", str(tmp_path / "env"))
    with Store() as store:
        assert store.url.endswith(f"env/{DB_FILE_NAME}")


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(path):
    with Store(f"sqlite:///{path}", busy_timeout_s=2.5) as store:
        with store._read() as conn:
            mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            timeout = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
    assert (mode, timeout) == ("wal", 2500)


def test_opening_twice_applies_each_version_once(path):
    url = f"sqlite:///{path}"
    with Store(url) as first:
        assert first.schema_version() == MIGRATIONS[-1].version
        assert first.migrate() == []
    with Store(url) as second:
        assert second.migrate() == []
        with second._read() as conn:
            versions = conn.execute(sa.select(
                store_schema.schema_version.c.version)).scalars().all()
    assert versions == [m.version for m in MIGRATIONS]


def test_version_one_creates_every_table_and_index(path):
    with Store(f"sqlite:///{path}") as store, store._read() as conn:
        inspector = sa.inspect(conn)
        assert set(inspector.get_table_names()) == {
            "schema_version", "tasks", "policies", "runs"}
        indexes = {ix["name"] for ix in inspector.get_indexes("tasks")}
    assert indexes == {"ix_tasks_at_cover", "ix_tasks_name_cover",
                       "ix_tasks_worker_cover", "ix_tasks_state_at"}


def test_later_steps_run_in_order_once(path):
    ran = []
    steps = MIGRATIONS + (
        Migration(2, "second", lambda conn: ran.append(2)),
        Migration(3, "third", lambda conn: ran.append(3)),
    )
    with Store(f"sqlite:///{path}") as store:
        assert migrate(store._write_transaction, steps) == [2, 3]
        assert migrate(store._write_transaction, steps) == []
    assert ran == [2, 3]


def test_a_failing_step_leaves_no_trace(path):
    def broken(conn):
        conn.execute(sa.text("CREATE TABLE half_done (x INTEGER)"))
        raise sa.exc.OperationalError("step", {}, Exception("disk full"))

    steps = MIGRATIONS + (Migration(2, "broken", broken),)
    with Store(f"sqlite:///{path}") as store:
        with pytest.raises(StoreError, match="disk full"):
            with store._boundary("migrate the schema"):
                migrate(store._write_transaction, steps)
        assert store.schema_version() == 1
        with store._read() as conn:
            assert not sa.inspect(conn).has_table("half_done")


def test_a_database_from_a_newer_manager_is_refused(path):
    with Store(f"sqlite:///{path}") as store, store._write("x") as conn:
        conn.execute(store_schema.schema_version.insert().values(
            version=99, description="future", applied_at=0.0))
    with pytest.raises(StoreError) as info:
        Store(f"sqlite:///{path}")
    assert "schema version 99, newer than this manager knows (1)" in \
        str(info.value)


def test_a_locked_database_is_a_store_error(path):
    store = Store(f"sqlite:///{path}", busy_timeout_s=0.05)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError) as info:
            store.upsert_tasks([sent_at("a", 1.0)])
        assert "database is locked" in str(info.value)
        assert isinstance(info.value.__cause__, sa.exc.OperationalError)
        # Readers are not blocked by a writer in WAL mode.
        assert store.query("tasks", None, None, None, None, None) == 0
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.upsert_tasks([sent_at("a", 1.0)]) == 1
    store.close()


def test_an_unreachable_database_is_a_store_error(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(StoreError) as info:
        Store(f"sqlite:///{blocked}/manager.db")
    assert "unable to open database file" in str(info.value)


def test_an_unsupported_database_is_refused():
    with pytest.raises(StoreError, match="SQLite and PostgreSQL, not"):
        Store("mysql+pymysql://u:secret@127.0.0.1/db")


# -- retention ------------------------------------------------------------------

def test_prune_deletes_old_tasks_in_chunks(path):
    with Store(f"sqlite:///{path}") as store:
        store.upsert_tasks([sent_at(f"old{i}", 100.0 + i)
                            for i in range(2500)])
        store.upsert_tasks([sent_at(f"new{i}", 5000.0) for i in range(10)])
        assert store.prune_chunk(cutoff=4000.0, chunk_rows=1000) == 1000
        deleted = store.prune(older_than_s=1000.0, now=5000.0,
                              chunk_rows=700)
        assert deleted == 1500
        assert store.query("tasks", None, None, None, None, None) == 10


def test_prune_can_be_stopped_between_chunks(path):
    with Store(f"sqlite:///{path}") as store:
        store.upsert_tasks([sent_at(f"t{i}", 1.0) for i in range(50)])
        assert store.prune(10.0, now=100.0, chunk_rows=20,
                           should_stop=lambda: True) == 20


def test_retention_thread_prunes_at_start_and_stops(path):
    with Store(f"sqlite:///{path}") as store:
        store.upsert_tasks([sent_at("ancient", 1.0)])
        retention = Retention(store, retention_s=60.0, every_s=3600.0,
                              chunk_rows=10, pause_s=0.0)
        retention.start()
        retention.stop()
        assert not retention.is_alive()
        assert retention.deleted == 1
        assert store.task("ancient") is None


def test_pruning_while_recording_loses_no_new_task(path):
    with Store(f"sqlite:///{path}") as store:
        store.upsert_tasks([sent_at(f"old{i}", 1.0) for i in range(3000)])
        errors = []

        def record():
            try:
                for batch in range(30):
                    store.upsert_tasks([sent_at(f"new{batch}-{i}", 9e9)
                                        for i in range(50)])
            except StoreError as exc:  # pragma: no cover - the failure
                errors.append(exc)

        writer = threading.Thread(target=record)
        writer.start()
        deleted = store.prune(100.0, now=1000.0, chunk_rows=100)
        writer.join()
        assert errors == []
        assert deleted == 3000
        assert store.query("tasks", None, None, None, None, None) == 1500
