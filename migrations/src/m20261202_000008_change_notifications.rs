//! Change notifications on PostgreSQL: triggers that `pg_notify` every gateway node when a row
//! a subscription shows changes.
//!
//! `NOTIFY` inside a transaction is delivered only when the transaction commits (and never if
//! it rolls back), so subscribers hear of a change exactly when it becomes visible to their
//! re-read, whichever node or code path made it. The payload carries ids only (the same JSON
//! as `smd_gateway::events::Event`): listeners re-read through the group-scoped queries.
//!
//! - `messages`: a new row, or a change of status or owner (sent, delivered, acknowledged,
//!   failed; received; assigned). Other columns (the outbox's lease and schedule) change
//!   often and show nothing, so they do not notify.
//! - `provider_accounts`, `provider_links`: any insert, update or delete (linked, approved,
//!   rejected, disconnected); the approval watcher's schedule columns are excluded likewise.
//!
//! SQLite has no notifications between connections; there the gateway runs as one node and its
//! services publish to an in-process bus after each commit. This migration does nothing there.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
CREATE OR REPLACE FUNCTION smd_notify_message_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'UPDATE' THEN
    IF NEW.status IS NOT DISTINCT FROM OLD.status
       AND NEW.owner_user_id IS NOT DISTINCT FROM OLD.owner_user_id THEN
      RETURN NULL;
    END IF;
  END IF;
  PERFORM pg_notify('smd_changes', json_build_object(
    'kind', 'message_changed', 'group_id', NEW.group_id, 'message_id', NEW.id)::text);
  RETURN NULL;
END
$$;

CREATE TRIGGER smd_messages_notify
  AFTER INSERT OR UPDATE ON messages
  FOR EACH ROW EXECUTE FUNCTION smd_notify_message_changed();

CREATE OR REPLACE FUNCTION smd_notify_integration_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  changed RECORD;
BEGIN
  IF TG_OP = 'DELETE' THEN
    changed := OLD;
  ELSE
    changed := NEW;
  END IF;
  -- (Nested: PL/pgSQL may evaluate every operand, and OLD is unset on INSERT.)
  IF TG_TABLE_NAME = 'provider_accounts' THEN
    IF TG_OP = 'UPDATE' THEN
      IF NEW.status IS NOT DISTINCT FROM OLD.status
         AND NEW.username IS NOT DISTINCT FROM OLD.username THEN
        RETURN NULL;
      END IF;
    END IF;
  END IF;
  PERFORM pg_notify('smd_changes', json_build_object(
    'kind', 'integration_changed', 'group_id', changed.group_id, 'provider', changed.provider)::text);
  RETURN NULL;
END
$$;

CREATE TRIGGER smd_provider_accounts_notify
  AFTER INSERT OR UPDATE OR DELETE ON provider_accounts
  FOR EACH ROW EXECUTE FUNCTION smd_notify_integration_changed();

CREATE TRIGGER smd_provider_links_notify
  AFTER INSERT OR UPDATE OR DELETE ON provider_links
  FOR EACH ROW EXECUTE FUNCTION smd_notify_integration_changed();
"#;

const DOWN: &str = r#"
DROP TRIGGER IF EXISTS smd_provider_links_notify ON provider_links;
DROP TRIGGER IF EXISTS smd_provider_accounts_notify ON provider_accounts;
DROP TRIGGER IF EXISTS smd_messages_notify ON messages;
DROP FUNCTION IF EXISTS smd_notify_integration_changed();
DROP FUNCTION IF EXISTS smd_notify_message_changed();
"#;

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            manager.get_connection().execute_unprepared(UP).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            manager.get_connection().execute_unprepared(DOWN).await?;
        }
        Ok(())
    }
}
