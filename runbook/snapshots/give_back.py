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
         nspacl AS acl, NULL::oid AS rel, NULL::text AS objtype
  FROM dropped
  UNION ALL
  SELECT CASE c.relkind WHEN 'S' THEN 2 ELSE 1 END,
         CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                        WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE'
                        ELSE 'TABLE' END,
         format('%I.%I', n.nspname, c.relname), c.relowner, c.relacl, c.oid, NULL
  FROM pg_class c JOIN dropped n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
    AND c.oid NOT IN (SELECT objid FROM members WHERE classid = 'pg_class'::regclass)
  UNION ALL
  SELECT 3, 'ROUTINE', p.oid::regprocedure::text, p.proowner, p.proacl, NULL, NULL
  FROM pg_proc p JOIN dropped n ON n.oid = p.pronamespace
  WHERE p.oid NOT IN (SELECT objid FROM members WHERE classid = 'pg_proc'::regclass)
  UNION ALL
  SELECT 3, CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, t.oid::regtype::text,
         t.typowner, t.typacl, NULL, NULL
  FROM pg_type t JOIN dropped n ON n.oid = t.typnamespace
  WHERE (t.typtype IN ('e', 'd', 'r')
         OR t.typtype = 'c' AND t.typrelid IN (SELECT oid FROM pg_class WHERE relkind = 'c'))
    AND t.oid NOT IN (SELECT objid FROM members WHERE classid = 'pg_type'::regclass)
  UNION ALL
  -- a default ACL: ALTER DEFAULT PRIVILEGES FOR ROLE owner IN SCHEMA ident, per object type
  SELECT 4, 'DEFAULT', quote_ident(n.nspname), d.defaclrole, d.defaclacl, NULL,
         CASE d.defaclobjtype WHEN 'r' THEN 'TABLES' WHEN 'S' THEN 'SEQUENCES'
                              WHEN 'f' THEN 'FUNCTIONS' ELSE 'TYPES' END
  FROM pg_default_acl d JOIN dropped n ON n.oid = d.defaclnamespace),
named AS (
  SELECT h.*, CASE h.kind WHEN 'DEFAULT' THEN '' ELSE h.kind || ' ' || h.ident END AS target,
         CASE WHEN h.kind IN ('VIEW', 'MATERIALIZED VIEW', 'FOREIGN TABLE')
              THEN 'TABLE ' || h.ident ELSE h.kind || ' ' || h.ident END AS on_what,
         CASE h.kind WHEN 'SCHEMA' THEN 'n' WHEN 'SEQUENCE' THEN 's' WHEN 'ROUTINE' THEN 'f'
                     WHEN 'TYPE' THEN 'T' WHEN 'DOMAIN' THEN 'T' ELSE 'r' END::"char" AS k
  FROM held h)
SELECT coalesce(jsonb_agg(jsonb_build_object(
  'kind', kind, 'ident', ident, 'target', target, 'owner_oid', owner::bigint,
  'owner', quote_ident(pg_get_userbyid(owner)),
  'objtype', objtype,
  -- every right in effect, the owner's own included (a NULL ACL is its kind's default):
  -- given back whole, an owner's revoked rights stay revoked, PUBLIC gets what it had
  'grants', (SELECT coalesce(jsonb_agg(format('GRANT %s ON %s TO %s%s', a.privilege_type,
                     on_what, CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                   ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
                     CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
                     ORDER BY a.grantee, a.privilege_type), '[]'::jsonb)
             FROM aclexplode(coalesce(acl, acldefault(k, owner))) a WHERE kind <> 'DEFAULT'),
  'public', EXISTS (SELECT 1 FROM aclexplode(coalesce(acl, acldefault(k, owner))) a
                    WHERE a.grantee = 0),
  'default_grants', (SELECT coalesce(jsonb_agg(jsonb_build_array(a.privilege_type,
                     CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                          ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
                     a.is_grantable) ORDER BY a.grantee, a.privilege_type), '[]'::jsonb)
             FROM aclexplode(acl) a WHERE kind = 'DEFAULT'),
  'columns', (SELECT coalesce(jsonb_agg(format('GRANT %s (%I) ON TABLE %s TO %s%s',
                     x.privilege_type, att.attname, ident,
                     CASE WHEN x.grantee = 0 THEN 'PUBLIC'
                          ELSE quote_ident(pg_get_userbyid(x.grantee)) END,
                     CASE WHEN x.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
                     ORDER BY att.attnum, x.grantee, x.privilege_type), '[]'::jsonb)
              FROM pg_attribute att CROSS JOIN LATERAL aclexplode(att.attacl) x
              WHERE att.attrelid = rel AND att.attnum > 0 AND NOT att.attisdropped
                AND att.attacl IS NOT NULL AND x.grantee <> owner),
  'k', k::text, 'on_what', on_what) ORDER BY ord, ident), '[]'::jsonb)::text
FROM named
"""

RECORD = ("SET LOCAL search_path = pg_catalog;\n"
          "DO $runbook$ BEGIN PERFORM set_config('runbook.held', (" + _HELD.strip()
          + "), true); END $runbook$;\n").encode()

MARK = b"runbook-not-given-back:"

# Just before COMMIT, in the same transaction. Each statement in its own subtransaction (a
# BEGIN ... EXCEPTION block): one refused is collected with its reason, never fatal.
GIVE_BACK = ("""
SET LOCAL search_path = pg_catalog;
DO $runbook$
DECLARE h jsonb; now_owner oid; now_acl aclitem[]; failed jsonb := '[]'; stmts text[];
        stmt text; others text;
BEGIN
  FOR h IN SELECT value FROM jsonb_array_elements(current_setting('runbook.held')::jsonb) LOOP
    -- looked up on its own: a name the snapshot cannot resolve (a function whose argument
    -- type is newer than it) raises instead of giving NULL, and must never fail the restore
    BEGIN
      CASE h->>'kind'
        WHEN 'SCHEMA', 'DEFAULT' THEN SELECT nspowner, nspacl INTO now_owner, now_acl
          FROM pg_namespace WHERE oid = to_regnamespace(h->>'ident');
        WHEN 'ROUTINE' THEN SELECT proowner, proacl INTO now_owner, now_acl
          FROM pg_proc WHERE oid = to_regprocedure(h->>'ident');
        WHEN 'TYPE', 'DOMAIN' THEN SELECT typowner, typacl INTO now_owner, now_acl
          FROM pg_type WHERE oid = to_regtype(h->>'ident');
        ELSE SELECT relowner, relacl INTO now_owner, now_acl
          FROM pg_class WHERE oid = to_regclass(h->>'ident');
      END CASE;
    EXCEPTION WHEN OTHERS THEN now_owner := NULL;
    END;
    CONTINUE WHEN now_owner IS NULL;  -- the dump did not make it again: nothing to give
    IF h->>'kind' = 'DEFAULT' THEN
      SELECT array_agg(format('ALTER DEFAULT PRIVILEGES FOR ROLE %s IN SCHEMA %s '
                              'GRANT %s ON %s TO %s%s', h->>'owner', h->>'ident', d.v->>0,
                              h->>'objtype', d.v->>1, CASE WHEN (d.v->>2)::boolean
                              THEN ' WITH GRANT OPTION' ELSE '' END))
        INTO stmts FROM jsonb_array_elements(h->'default_grants') AS d(v);
    ELSE
      stmts := '{}';
      IF now_owner <> (h->>'owner_oid')::oid THEN
        stmt := format('ALTER %s OWNER TO %s', h->>'target', h->>'owner');
        BEGIN
          EXECUTE stmt;
          now_owner := (h->>'owner_oid')::oid;
        EXCEPTION WHEN OTHERS THEN
          failed := failed || jsonb_build_array(jsonb_build_array(stmt, SQLERRM));
        END;
      END IF;
      IF now_owner = (h->>'owner_oid')::oid THEN
        -- the owner's again: every right in effect now goes (the restoring user's default
        -- privileges, the prelude's USAGE on public), then exactly what was in effect
        -- (now_acl was read before the ALTER, which gave the old owner's entries to the
        -- owner: so the owner is named too)
        SELECT string_agg(DISTINCT g, ', ') INTO others FROM (
          SELECT quote_ident(pg_get_userbyid(a.grantee))
          FROM aclexplode(coalesce(now_acl, acldefault((h->>'k')::"char", now_owner))) a
          WHERE a.grantee <> 0
          UNION SELECT h->>'owner') AS x(g);
        stmts := stmts || format('REVOKE ALL ON %s FROM %s', h->>'on_what',
                                 concat_ws(', ', others, 'PUBLIC'));
      ELSIF NOT (h->>'public')::boolean THEN
        -- kept by the restoring user (it may not give it away): what it holds stays, the
        -- old owner gets its rights as GRANTs below, PUBLIC nothing it did not have
        stmts := stmts || format('REVOKE ALL ON %s FROM PUBLIC', h->>'on_what');
      END IF;
      stmts := stmts || ARRAY(SELECT jsonb_array_elements_text(h->'grants'))
                     || ARRAY(SELECT jsonb_array_elements_text(h->'columns'));
    END IF;
    FOREACH stmt IN ARRAY coalesce(stmts, '{}') LOOP
      BEGIN
        EXECUTE stmt;
      EXCEPTION WHEN OTHERS THEN
        failed := failed || jsonb_build_array(jsonb_build_array(stmt, SQLERRM));
      END;
    END LOOP;
  END LOOP;
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
