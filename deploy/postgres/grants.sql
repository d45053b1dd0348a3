-- Table privileges for paybus's roles; run as the OWNER after every `paybus migrate` (idempotent):
--
--   paybus migrate          # DATABASE_URL=postgresql://paybus_owner@db-host/paybus
--   psql "postgresql://paybus_owner@db-host/paybus" -v ON_ERROR_STOP=1 -f deploy/postgres/grants.sql
--
-- Default privileges make tables of future migrations usable at once; the explicit grants and revokes
-- below cover what exists and take back what the defaults gave too generously. Same -v prefix=... as
-- roles.sql when you changed it there.

\if :{?prefix}
\else
  \set prefix paybus
\endif
\set owner :prefix '_owner'
\set processor :prefix '_processor'
\set operator :prefix '_operator'
\set readonly :prefix '_readonly'

BEGIN;

ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"processor", :"operator";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO :"readonly";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO :"processor", :"operator";

GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"processor", :"operator";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"readonly";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO :"processor", :"operator";

-- stripe_events is the audit log and idempotency ledger ("applied at most once, forever"): the
-- service adds and annotates rows but never removes one. Archiving is an operator's decision.
REVOKE DELETE, TRUNCATE ON stripe_events FROM :"processor";

-- yoyo's bookkeeping belongs to migrations alone: the services may read it, never change it.
SELECT format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON %I FROM %I, %I', tablename, :'processor', :'operator')
  FROM pg_tables
 WHERE schemaname = 'public' AND (tablename LIKE '\_yoyo%' OR tablename = 'yoyo_lock')
\gexec

COMMIT;
