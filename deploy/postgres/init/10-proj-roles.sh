#!/bin/sh
# proj's two database roles. The postgres image runs this file (it runs what
# /docker-entrypoint-initdb.d holds, as POSTGRES_USER, when its data volume is
# new; docker-compose.yml mounts this folder there). On a server of your own,
# run it once as a superuser: PGHOST=... PGUSER=postgres POSTGRES_DB=proj
# PROJ_OWNER_PASSWORD=... PROJ_APP_PASSWORD=... sh 10-proj-roles.sh
#
# proj_owner  owns the tables: `proj db upgrade` connects as it and creates
#             them with their row-level security. BYPASSRLS, so that a data
#             migration sees every tenant's rows (as their owner it could
#             switch the policies off anyway); nothing else connects as it.
# proj_app    what web, worker, beat and relay connect as. It reads and writes
#             rows of every table proj_owner makes (the default privileges
#             below) and can do nothing else: neither superuser, nor BYPASSRLS,
#             nor owner of a table, so forced row-level security binds it and
#             it cannot switch it off (proj check reports a role that could).
#
# PROJ_OWNER_ROLE and PROJ_APP_ROLE rename them (several databases on one server).
set -e

database="${POSTGRES_DB:-proj}"
owner="${PROJ_OWNER_ROLE:-proj_owner}"
app="${PROJ_APP_ROLE:-proj_app}"
: "${PROJ_OWNER_PASSWORD:?set PROJ_OWNER_PASSWORD}"
: "${PROJ_APP_PASSWORD:?set PROJ_APP_PASSWORD}"

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${PGUSER:-${POSTGRES_USER:-postgres}}" \
  --dbname "$database" \
  -v database="$database" -v owner="$owner" -v app="$app" \
  -v owner_password="$PROJ_OWNER_PASSWORD" -v app_password="$PROJ_APP_PASSWORD" <<'SQL'
CREATE ROLE :"owner" LOGIN PASSWORD :'owner_password'
  NOSUPERUSER BYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION;
CREATE ROLE :"app" LOGIN PASSWORD :'app_password'
  NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION;

-- Only proj's roles connect; only the owner creates anything.
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"database" TO :"owner";
GRANT CONNECT ON DATABASE :"database" TO :"app";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO :"owner";
GRANT USAGE ON SCHEMA public TO :"app";

-- Whatever the owner creates from now on, the application may use its rows.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
  GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO :"app";
SQL
