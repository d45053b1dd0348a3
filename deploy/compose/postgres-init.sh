#!/bin/sh
# First start of the compose Postgres: paybus's roles and database (deploy/postgres/roles.sql), then one
# development password for every LOGIN role. Passwords go through psql variables, never argv.
set -eu
psql -v ON_ERROR_STOP=1 -X -U "$POSTGRES_USER" -d postgres -f /paybus/roles.sql
for role in owner processor operator readonly; do
  echo "ALTER ROLE paybus_$role PASSWORD :'pw';" \
    | psql -v ON_ERROR_STOP=1 -X -q -U "$POSTGRES_USER" -d postgres -v pw="$PAYBUS_DB_PASSWORD"
done
