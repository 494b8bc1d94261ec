"""Owners and GRANTs given back, inside the restore's own transaction.

Snapshots are dumped with --no-owner --no-acl (the tooling's, and ours), and the restore
drops every schema: without this, the restoring role owned every table after it and the
other roles lost every GRANT. Run as a superuser (what a refusal tells on-call to use when
the app role may not drop a schema), the app's own role lost its tables and every request
that touched the database failed, while the restore ended "Done" (found by review).

So the prelude records, before its DROPs, who owns what in the schemas it drops and every
right in effect there (a transaction-local setting: no temporary table, which needs the TEMP
privilege), and just before COMMIT the same transaction gives each back to the objects the
dump made again under the same name: the owner, then exactly the rights recorded (those in
effect are revoked first: the restoring user's default privileges, an owner's rights the
ALTER gave back whole). Each statement runs in its own subtransaction, the lookup too (a
function whose argument type is newer than the snapshot raises): one this user may not run
is reported with its statement and reason, never fails the restore. Ownership it may not
give (no superuser, no member of the owner role) stays its own, and the old owner gets its
rights as GRANTs. Left out: what the dump does not make again (nothing to give back to) and
large objects (never restored: snapshots/dump.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# The schemas the prelude drops (replay.DROP_THE_REST's choice)
DROPPED = "nspname <> 'information_schema' AND nspname NOT LIKE 'pg\\_%'"

# Before the DROPs: every owned object in the dropped schemas, with its owner and its GRANTs
# to others, as JSON in `runbook.held`. search_path is pg_catalog only, so a function's and a
# type's names come out schema-qualified, as the dump's own search_path ('') needs them.
# Extension members are left out: CREATE EXTENSION makes them again, owned by the extension.
_HELD = f"""
WITH dropped AS (SELECT oid, nspname, nspowner, nspacl FROM pg_namespace WHERE {DROPPED}),
members AS (SELECT classid, objid FROM pg_depend WHERE deptype = 'e'),
held AS (
  SELECT 0 AS ord, 'SCHEMA' AS kind, quote_ident(nspname) AS ident, nspowner AS owner,
         nspacl AS acl, NULL::oid AS rel, NULL::text AS objtype, quote_ident(nspname) AS nsp
  FROM dropped
  UNION ALL
  SELECT CASE c.relkind WHEN 'S' THEN 2 ELSE 1 END,
         CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                        WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE'
                        ELSE 'TABLE' END,
         format('%I.%I', n.nspname, c.relname), c.relowner, c.relacl, c.oid, NULL,
         quote_ident(n.nspname)
  FROM pg_class c JOIN dropped n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
    AND c.oid NOT IN (SELECT objid FROM members WHERE classid = 'pg_class'::regclass)
  UNION ALL
  SELECT 3, 'ROUTINE', p.oid::regprocedure::text, p.proowner, p.proacl, NULL, NULL,
         quote_ident(n.nspname)
  FROM pg_proc p JOIN dropped n ON n.oid = p.pronamespace
  WHERE p.oid NOT IN (SELECT objid FROM members WHERE classid = 'pg_proc'::regclass)
  UNION ALL
  SELECT 3, CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, t.oid::regtype::text,
         t.typowner, t.typacl, NULL, NULL, quote_ident(n.nspname)
  FROM pg_type t JOIN dropped n ON n.oid = t.typnamespace
  WHERE (t.typtype IN ('e', 'd', 'r')
         OR t.typtype = 'c' AND t.typrelid IN (SELECT oid FROM pg_class WHERE relkind = 'c'))
    AND t.oid NOT IN (SELECT objid FROM members WHERE classid = 'pg_type'::regclass)
  UNION ALL
  -- a default ACL: ALTER DEFAULT PRIVILEGES FOR ROLE owner IN SCHEMA ident, per object type
  SELECT 4, 'DEFAULT', quote_ident(n.nspname), d.defaclrole, d.defaclacl, NULL,
         CASE d.defaclobjtype WHEN 'r' THEN 'TABLES' WHEN 'S' THEN 'SEQUENCES'
                              WHEN 'f' THEN 'FUNCTIONS' ELSE 'TYPES' END,
         quote_ident(n.nspname)
  FROM pg_default_acl d JOIN dropped n ON n.oid = d.defaclnamespace),
-- the one role that owned every table of each schema (NULL when several did), and of the
-- database's tables: tables only (a role owning a few views or functions is no owner of
-- the app's data; counting them handed a table the snapshot brought back to a reporting
-- role: found by review)
owners AS (SELECT DISTINCT nsp, owner FROM held WHERE kind = 'TABLE'),
modes AS (SELECT nsp, CASE WHEN count(*) = 1 THEN min(owner) END AS owner
          FROM owners GROUP BY nsp),
dbmode AS (SELECT CASE WHEN count(DISTINCT owner) = 1 THEN min(owner) END AS owner
           FROM owners),
named AS (
  SELECT h.*,
         CASE WHEN h.kind IN ('VIEW', 'MATERIALIZED VIEW', 'FOREIGN TABLE')
              THEN 'TABLE ' || h.ident ELSE h.kind || ' ' || h.ident END AS on_what,
         CASE h.kind WHEN 'SCHEMA' THEN 'n' WHEN 'SEQUENCE' THEN 's' WHEN 'ROUTINE' THEN 'f'
                     WHEN 'TYPE' THEN 'T' WHEN 'DOMAIN' THEN 'T' ELSE 'r' END::"char" AS k
  FROM held h)
SELECT coalesce(jsonb_agg(jsonb_build_object(
  'kind', kind, 'ident', ident, 'owner_oid', owner::bigint,
  'owner', quote_ident(pg_get_userbyid(owner)),
  'objtype', objtype,
  -- every right in effect, the owner's own included (a NULL ACL is its kind's default):
  -- given back whole, an owner's revoked rights stay revoked, PUBLIC gets what it had
  -- (one GRANT per grantee: a restore of a thousand tables ran ten statements each)
  'grants', (SELECT coalesce(jsonb_agg(format('GRANT %s ON %s TO %s%s', g.privs, on_what,
                                              g.who, g.opt) ORDER BY g.who, g.opt), '[]'::jsonb)
             FROM (SELECT string_agg(a.privilege_type, ', ' ORDER BY a.privilege_type) AS privs,
                          CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                               ELSE quote_ident(pg_get_userbyid(a.grantee)) END AS who,
                          CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END AS opt
                   FROM aclexplode(coalesce(acl, acldefault(k, owner))) a
                   WHERE kind <> 'DEFAULT' GROUP BY 2, 3) g),
  'acl_null', acl IS NULL,
  'public', EXISTS (SELECT 1 FROM aclexplode(coalesce(acl, acldefault(k, owner))) a
                    WHERE a.grantee = 0),
  'default_grants', (SELECT coalesce(jsonb_agg(jsonb_build_array(a.privilege_type,
                     CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                          ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
                     a.is_grantable) ORDER BY a.grantee, a.privilege_type), '[]'::jsonb)
             FROM aclexplode(acl) a WHERE kind = 'DEFAULT'),
  -- [column, GRANT]: a column the snapshot does not have is passed by
  'columns', (SELECT coalesce(jsonb_agg(jsonb_build_array(att.attname::text,
                     format('GRANT %s (%I) ON TABLE %s TO %s%s',
                     x.privilege_type, att.attname, ident,
                     CASE WHEN x.grantee = 0 THEN 'PUBLIC'
                          ELSE quote_ident(pg_get_userbyid(x.grantee)) END,
                     CASE WHEN x.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END))
                     ORDER BY att.attnum, x.grantee, x.privilege_type), '[]'::jsonb)
              FROM pg_attribute att CROSS JOIN LATERAL aclexplode(att.attacl) x
              WHERE att.attrelid = rel AND att.attnum > 0 AND NOT att.attisdropped
                AND att.attacl IS NOT NULL AND x.grantee <> owner),
  -- a schema's: the role that owned all its tables (when it had none, all the database's),
  -- which what the snapshot brings back and the database no longer had (a table a
  -- migration renamed or dropped since) goes to; NULL when that cannot be told
  'sole_owner', CASE WHEN kind = 'SCHEMA' THEN quote_ident(pg_get_userbyid(coalesce(
      (SELECT m.owner FROM modes m WHERE m.nsp = named.ident), (SELECT owner FROM dbmode))))
      END,
  'k', k::text, 'on_what', on_what) ORDER BY ord, ident), '[]'::jsonb)::text
FROM named
"""

# JIT compiled the record query (a 300-table restore took 6.5 s against 2.3 s: found by
# review); `jit` is Postgres 11's, and an unknown setting would fail the prelude before it
JIT_OFF = ("SELECT set_config('jit', 'off', true) "
           "WHERE current_setting('server_version_num')::int >= 110000;\n")


def record(query: str = _HELD) -> bytes:
    """The prelude's part: `query` kept in `runbook.held`. Guarded: a query that fails on
    some database's catalog records nothing (said at the end) and never fails the restore."""
    return ("SET LOCAL search_path = pg_catalog;\n" + JIT_OFF
            + "DO $runbook$ BEGIN PERFORM set_config('runbook.held', (" + query.strip()
            + "), true); EXCEPTION WHEN OTHERS THEN "
            "PERFORM set_config('runbook.held', '[]', true); "
            "PERFORM set_config('runbook.held_failed', SQLERRM, true); END $runbook$;\n"
            ).encode()


RECORD = record()

MARK = b"runbook-not-given-back:"

# Just before COMMIT, in the same transaction. Each statement in its own subtransaction (a
# BEGIN ... EXCEPTION block): one refused is collected with its reason, never fatal.
GIVE_BACK = ("""
SET LOCAL search_path = pg_catalog;
""" + JIT_OFF + """DO $runbook$
DECLARE h jsonb; obj oid; now_owner oid; now_acl aclitem[]; k_relkind "char"; verb text;
        failed jsonb := '[]'; stmts text[]; stmt text; others text; me oid; same boolean;
        held jsonb := current_setting('runbook.held')::jsonb; o record; idents text[];
BEGIN
 IF current_setting('runbook.held_failed', true) <> '' THEN
   failed := jsonb_build_array(jsonb_build_array(
     'the owners and GRANTs before the restore (they could not be recorded, so none was '
     'given back)', current_setting('runbook.held_failed', true)));
 END IF;
 -- a fault of this block itself never fails the restore: undone whole, and said
 BEGIN
  idents := ARRAY(SELECT value->>'ident' FROM jsonb_array_elements(held));
  SELECT oid INTO me FROM pg_roles WHERE rolname = current_user;
  FOR h IN SELECT value FROM jsonb_array_elements(held) LOOP
    -- looked up on its own: a name the snapshot cannot resolve (a function whose argument
    -- type is newer than it) raises instead of giving NULL, and must never fail the restore
    obj := NULL; k_relkind := NULL;
    BEGIN
      CASE h->>'kind'
        WHEN 'SCHEMA', 'DEFAULT' THEN SELECT oid, nspowner, nspacl INTO obj, now_owner, now_acl
          FROM pg_namespace WHERE oid = to_regnamespace(h->>'ident');
        WHEN 'ROUTINE' THEN SELECT oid, proowner, proacl INTO obj, now_owner, now_acl
          FROM pg_proc WHERE oid = to_regprocedure(h->>'ident');
        WHEN 'TYPE', 'DOMAIN' THEN SELECT oid, typowner, typacl INTO obj, now_owner, now_acl
          FROM pg_type WHERE oid = to_regtype(h->>'ident');
        ELSE SELECT c.oid, c.relowner, c.relacl, c.relkind INTO obj, now_owner, now_acl, k_relkind
          FROM pg_class c WHERE c.oid = to_regclass(h->>'ident');
      END CASE;
    EXCEPTION WHEN OTHERS THEN obj := NULL;
    END;
    CONTINUE WHEN obj IS NULL;  -- the dump did not make it again: nothing to give
    -- what the object is now says the ALTER (a table a migration made a view since)
    verb := CASE WHEN k_relkind = 'S' THEN 'SEQUENCE' WHEN k_relkind = 'v' THEN 'VIEW'
                 WHEN k_relkind = 'm' THEN 'MATERIALIZED VIEW' WHEN k_relkind = 'f'
                 THEN 'FOREIGN TABLE' WHEN k_relkind IS NOT NULL THEN 'TABLE'
                 ELSE h->>'kind' END;
    IF h->>'kind' = 'DEFAULT' THEN
      SELECT array_agg(format('ALTER DEFAULT PRIVILEGES FOR ROLE %s IN SCHEMA %s '
                              'GRANT %s ON %s TO %s%s', h->>'owner', h->>'ident', d.v->>0,
                              h->>'objtype', d.v->>1, CASE WHEN (d.v->>2)::boolean
                              THEN ' WITH GRANT OPTION' ELSE '' END))
        INTO stmts FROM jsonb_array_elements(h->'default_grants') AS d(v);
    ELSE
      stmts := '{}';
      -- a sequence a table owns (serial, identity) goes with the table's ALTER, never its own
      IF now_owner <> (h->>'owner_oid')::oid AND NOT (k_relkind = 'S' AND EXISTS (
          SELECT 1 FROM pg_depend WHERE classid = 'pg_class'::regclass AND objid = obj
            AND refclassid = 'pg_class'::regclass AND deptype IN ('a', 'i'))) THEN
        stmt := format('ALTER %s %s OWNER TO %s', verb, h->>'ident', h->>'owner');
        BEGIN
          EXECUTE stmt;
          now_owner := (h->>'owner_oid')::oid;
        EXCEPTION WHEN OTHERS THEN
          failed := failed || jsonb_build_array(jsonb_build_array(stmt, SQLERRM));
        END;
      END IF;
      same := now_owner = (h->>'owner_oid')::oid;
      IF NOT (same AND (h->>'acl_null')::boolean AND now_acl IS NULL) THEN
        -- every right in effect now goes (the restoring user's default privileges, the
        -- prelude's USAGE on public), then exactly what was in effect. now_acl was read
        -- before the ALTER, which gave the old owner's entries to the owner: named too.
        -- Kept by the restoring user (it may not give it away), it keeps its own rights
        -- and the old owner gets its rights as GRANTs.
        SELECT string_agg(DISTINCT g, ', ') INTO others FROM (
          SELECT quote_ident(pg_get_userbyid(a.grantee))
          FROM aclexplode(coalesce(now_acl, acldefault((h->>'k')::"char", now_owner))) a
          WHERE a.grantee <> 0 AND (same OR a.grantee <> me)
          UNION SELECT h->>'owner' WHERE same) AS x(g);
        stmts := stmts || format('REVOKE ALL ON %s FROM %s', h->>'on_what',
                                 concat_ws(', ', others, 'PUBLIC'))
                       || ARRAY(SELECT jsonb_array_elements_text(h->'grants'));
      END IF;
      -- (its kind's default rights then and now, most tables: nothing more to give)
      stmts := stmts || ARRAY(SELECT c.v->>1 FROM jsonb_array_elements(h->'columns') AS c(v)
                              WHERE EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = obj
                                              AND attname = c.v->>0 AND NOT attisdropped));
    END IF;
    -- an object's statements in one subtransaction; only when one is refused, each alone,
    -- so the refused one is named and the others still run
    CONTINUE WHEN coalesce(cardinality(stmts), 0) = 0;
    BEGIN
      FOREACH stmt IN ARRAY stmts LOOP
        EXECUTE stmt;
      END LOOP;
    EXCEPTION WHEN OTHERS THEN
      FOREACH stmt IN ARRAY stmts LOOP
        BEGIN
          EXECUTE stmt;
        EXCEPTION WHEN OTHERS THEN
          failed := failed || jsonb_build_array(jsonb_build_array(stmt, SQLERRM));
        END;
      END LOOP;
    END;
  END LOOP;
  -- what the snapshot brought back that the database no longer had (a table a migration
  -- renamed or dropped since), owned by this user now: to the one role that owned the rest
  -- of its schema; named, when they were several
  FOR h IN SELECT value FROM jsonb_array_elements(held)
           WHERE value->>'kind' = 'SCHEMA' AND value->>'sole_owner' IS DISTINCT FROM
                 quote_ident(current_user) LOOP
    FOR o IN
      SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                            WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE'
                            ELSE 'TABLE' END AS verb,
             format('%I.%I', n.nspname, c.relname) AS ident, c.relacl AS acl,
             CASE c.relkind WHEN 'S' THEN 'SEQUENCE ' ELSE 'TABLE ' END AS on_kind
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.oid = to_regnamespace(h->>'ident') AND c.relowner = me
        AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
        -- (a table's own sequence goes with it; a partition does not: given its own ALTER)
        AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                          AND d.objid = c.oid AND (d.deptype = 'e' OR c.relkind = 'S'
                                                   AND d.deptype IN ('a', 'i')))
      UNION ALL
      SELECT 'ROUTINE', p.oid::regprocedure::text, NULL, NULL FROM pg_proc p
      WHERE p.pronamespace = to_regnamespace(h->>'ident') AND p.proowner = me
        AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                          AND d.objid = p.oid AND d.deptype = 'e')
      UNION ALL
      SELECT CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, t.oid::regtype::text,
             NULL, NULL
      FROM pg_type t WHERE t.typnamespace = to_regnamespace(h->>'ident') AND t.typowner = me
        AND (t.typtype IN ('e', 'd', 'r') OR t.typtype = 'c' AND t.typrelid IN (
             SELECT oid FROM pg_class WHERE relkind = 'c'))
        AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass
                          AND d.objid = t.oid AND d.deptype = 'e')
    LOOP
      CONTINUE WHEN o.ident = ANY (idents);
      IF h->>'sole_owner' IS NULL THEN
        failed := failed || jsonb_build_array(jsonb_build_array(
          format('ALTER %s %s OWNER TO <its owner>', o.verb, o.ident),
          'it was not in the database before the restore, and what was in its schema had '
          'several owners'));
        CONTINUE;
      END IF;
      stmt := format('ALTER %s %s OWNER TO %s', o.verb, o.ident, h->>'sole_owner');
      BEGIN
        -- a table or sequence has no rights but its owner's by default: what this user's
        -- default privileges gave others when the dump made it goes first
        IF o.acl IS NOT NULL THEN
          SELECT string_agg(DISTINCT quote_ident(pg_get_userbyid(a.grantee)), ', ')
            INTO others FROM aclexplode(o.acl) a WHERE a.grantee NOT IN (0, me);
          EXECUTE format('REVOKE ALL ON %s%s FROM %s', o.on_kind, o.ident,
                         concat_ws(', ', others, 'PUBLIC'));
        END IF;
        EXECUTE stmt;
      EXCEPTION WHEN OTHERS THEN
        failed := failed || jsonb_build_array(jsonb_build_array(stmt, SQLERRM));
      END;
    END LOOP;
  END LOOP;
 EXCEPTION WHEN OTHERS THEN
  failed := jsonb_build_array(jsonb_build_array(
    'the owners and GRANTs recorded before the restore (none was given back)', SQLERRM));
 END;
  PERFORM set_config('runbook.not_given_back', failed::text, true);
END $runbook$;
SELECT '""" + MARK.decode() + """' || current_setting('runbook.not_given_back') AS runbook;
""").encode()


@dataclass(frozen=True)
class NotGivenBack:
    """A statement the restore's user was refused, and Postgres's reason."""

    statement: str
    reason: str

    def describe(self) -> str:
        return f"`{self.statement}` ({self.reason})"


def not_given_back(output: bytes) -> list[NotGivenBack] | None:
    """What psql printed of GIVE_BACK's report; None when it printed none (its output was
    lost with a failed exec: whether all was given back cannot be told)."""
    found = re.findall(re.escape(MARK) + rb"(\[.*\])", output)
    if not found:
        return None
    try:
        pairs = json.loads(found[-1].decode(errors="replace"))
    except ValueError:
        return None
    return [NotGivenBack(str(s), str(r)) for s, r in pairs]


def describe(refused: list[NotGivenBack], user: str) -> str:
    """The end-of-run notice for what was not given back: each statement, to run as a
    role that may (a superuser)."""
    named = "; ".join(r.describe() for r in refused[:6])
    more = f"; and {len(refused) - 6} more" if len(refused) > 6 else ""
    return (f"the restore could not give back everything other roles held before it "
            f"(snapshots keep no owners or GRANTs; {user} was refused): {named}{more}; run "
            "them as a superuser, or the owner, now")
