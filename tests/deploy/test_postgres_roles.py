"""deploy/postgres: a role per service, migrations by a separate owner, each role able to do its job only."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors, sql

from tests.deploy.conftest import Cluster
from tests.support import PG_BASE, unique

pytestmark = pytest.mark.timeout(90)


def refused(url: str, statement: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute(statement)


def test_tables_belong_to_the_owner_that_ran_the_migrations(cluster: Cluster) -> None:
    with psycopg.connect(cluster.url("owner")) as conn:
        rows = conn.execute("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'").fetchall()
    owners = {row[0] for row in rows}
    assert owners == {cluster.role("owner")}


def test_ingress_has_no_database_access(cluster: Cluster) -> None:
    with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
        psycopg.connect(cluster.url("ingress"))
    with psycopg.connect(f"{PG_BASE}/{cluster.dbname}") as conn:
        row = conn.execute(
            """SELECT has_database_privilege(%(r)s, %(db)s, 'CONNECT'),
                      bool_or(has_table_privilege(%(r)s, format('%%I', tablename), 'SELECT'))
                 FROM pg_tables WHERE schemaname = 'public'""",
            {"r": cluster.role("ingress"), "db": cluster.dbname},
        ).fetchone()
    assert row == (False, False)


def test_a_role_not_granted_cannot_connect(cluster: Cluster) -> None:
    stranger = f"{cluster.prefix}_stranger"
    with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(stranger)))
        try:
            host = PG_BASE.split("@", 1)[1]
            with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
                psycopg.connect(f"postgresql://{stranger}@{host}/{cluster.dbname}")
        finally:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(stranger)))


def test_processor_writes_rows_but_cannot_change_the_schema(cluster: Cluster) -> None:
    url = cluster.url("processor")
    event_id = unique("evt")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO stripe_events (id, type, created, livemode, payload)"
            " VALUES (%s, 'x.y', now(), false, '{}')",
            (event_id,),
        )
        conn.execute("UPDATE stripe_events SET outcome = 'ignored' WHERE id = %s", (event_id,))
        # bigserial: needs the sequence too
        conn.execute("INSERT INTO outbox (event_type, payload) VALUES ('payment.succeeded', '{}')")
        conn.execute("DELETE FROM outbox WHERE event_type = 'payment.succeeded'")
    for statement in (
        "DROP TABLE payments",
        "ALTER TABLE payments ADD COLUMN sneaky text",
        "CREATE TABLE sneaky (id int)",
        "TRUNCATE payments",
        "DELETE FROM stripe_events",
        "TRUNCATE stripe_events",
        "DELETE FROM _yoyo_migration",
        "INSERT INTO _yoyo_log (id, migration_hash, migration_id, operation, created_at_utc)"
        " VALUES (gen_random_uuid()::text, 'x', 'x', 'apply', now())",
        "CREATE TEMP TABLE scratch (id int)",
    ):
        refused(url, statement)


def test_operator_may_archive_events_but_not_alter_tables(cluster: Cluster) -> None:
    url = cluster.url("operator")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM stripe_events WHERE received_at < now() - interval '10 years'")
    refused(url, "DROP TABLE stripe_events")
    refused(url, "ALTER TABLE payments DROP COLUMN metadata")


def test_readonly_only_reads(cluster: Cluster) -> None:
    url = cluster.url("readonly")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM active_entitlements").fetchone() is not None
    refused(url, "INSERT INTO outbox (event_type, payload) VALUES ('x', '{}')")
    refused(url, "UPDATE payments SET status = 'succeeded'")


def test_tables_of_a_later_migration_are_usable_without_new_grants(cluster: Cluster) -> None:
    # what a future NNNN migration does: the owner creates a table; default privileges cover it
    table = unique("later").lower()
    with psycopg.connect(cluster.url("owner"), autocommit=True) as conn:
        create = sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, note text)")
        conn.execute(create.format(sql.Identifier(table)))
    with psycopg.connect(cluster.url("processor"), autocommit=True) as conn:
        conn.execute(sql.SQL("INSERT INTO {} (note) VALUES ('x')").format(sql.Identifier(table)))
    refused(cluster.url("readonly"), f"INSERT INTO {table} (note) VALUES ('x')")  # noqa: S608
    refused(cluster.url("processor"), f"DROP TABLE {table}")
