-- paybus's Postgres roles and database; run ONCE per server as a superuser (or a CREATEROLE+CREATEDB admin):
--
--   psql "postgresql://postgres@db-host/postgres" -v ON_ERROR_STOP=1 -f deploy/postgres/roles.sql
--   psql ... -v prefix=acme_paybus -v dbname=acme_paybus -f deploy/postgres/roles.sql   # other names
--
-- Roles (named <prefix>_<what>, default prefix "paybus"):
--   owner      owns the database and every table; `paybus migrate` runs as this role, nothing else does
--   processor  the processor: read and write rows, no DDL, never DELETE from the stripe_events audit ledger
--   operator   the paybus CLI (replay, reconcile, inspect): like the processor, and may archive old events
--   readonly   support staff and analytics: SELECT only
--   ingress    NOLOGIN and granted nothing: the ingress never touches Postgres
-- No password is set here (none belongs in git): give each LOGIN role one with psql's \password, which
-- sends only a SCRAM hash, e.g.  psql ... -c '\password paybus_processor'
-- Then, after every `paybus migrate`, run deploy/postgres/grants.sql as the owner.
-- Idempotent: running it again changes nothing.

\if :{?prefix}
\else
  \set prefix paybus
\endif
\if :{?dbname}
\else
  \set dbname paybus
\endif
\set owner :prefix '_owner'
\set processor :prefix '_processor'
\set operator :prefix '_operator'
\set readonly :prefix '_readonly'
\set ingress :prefix '_ingress'

SELECT format('CREATE ROLE %I %s NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS', r.name, r.login)
  FROM (VALUES (:'owner', 'LOGIN'), (:'processor', 'LOGIN'), (:'operator', 'LOGIN'),
               (:'readonly', 'LOGIN'), (:'ingress', 'NOLOGIN')) AS r(name, login)
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r.name)
\gexec

SELECT format('CREATE DATABASE %I OWNER %I', :'dbname', :'owner')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'dbname')
\gexec

-- Only the named roles may connect; PUBLIC (every other role, ingress included) may not.
REVOKE ALL ON DATABASE :"dbname" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"dbname" TO :"processor", :"operator", :"readonly";
GRANT CONNECT, CREATE, TEMPORARY ON DATABASE :"dbname" TO :"owner";

\connect :dbname
-- Postgres 15+ already keeps PUBLIC from creating objects in schema public; older servers do not.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO :"owner";
GRANT USAGE ON SCHEMA public TO :"processor", :"operator", :"readonly";
