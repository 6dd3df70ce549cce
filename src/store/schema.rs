//! The store's schema as versioned migrations.
//!
//! Each migration is frozen once released: a file made by any earlier build is
//! upgraded by running the ones it lacks, in order. Change the schema only by
//! appending a migration.

use std::path::Path;

use rusqlite::Connection;
use rusqlite_migration::{Migrations, M};

use crate::{Error, Result};

/// Version 1: users, their history items and the full-text index over them.
///
/// `items.id` is an explicit INTEGER PRIMARY KEY because the FTS index refers
/// to rows by rowid, and VACUUM may renumber an implicit rowid.
const V1_HISTORY: &str = r#"
CREATE TABLE users (
    user_id TEXT PRIMARY KEY NOT NULL,
    created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (user_id),
    item_id TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    time_us INTEGER NOT NULL,
    request TEXT NOT NULL,
    text TEXT NOT NULL,
    source TEXT NOT NULL,
    UNIQUE (user_id, item_id)
) STRICT;

CREATE INDEX items_by_time ON items (user_id, time_us, item_id);

CREATE VIRTUAL TABLE items_fts USING fts5 (
    user_id, request, text,
    content = 'items', content_rowid = 'id',
    tokenize = 'porter unicode61'
);

INSERT INTO items_fts (items_fts, rank) VALUES ('secure-delete', 1);

CREATE TRIGGER items_fts_insert AFTER INSERT ON items BEGIN
    INSERT INTO items_fts (rowid, user_id, request, text)
    VALUES (new.id, new.user_id, new.request, new.text);
END;

CREATE TRIGGER items_fts_delete AFTER DELETE ON items BEGIN
    INSERT INTO items_fts (items_fts, rowid, user_id, request, text)
    VALUES ('delete', old.id, old.user_id, old.request, old.text);
END;

CREATE TRIGGER items_fts_update AFTER UPDATE ON items BEGIN
    INSERT INTO items_fts (items_fts, rowid, user_id, request, text)
    VALUES ('delete', old.id, old.user_id, old.request, old.text);
    INSERT INTO items_fts (rowid, user_id, request, text)
    VALUES (new.id, new.user_id, new.request, new.text);
END;
"#;

/// Version 2: the cache of computed preference effects.
const V2_EFFECT_CACHE: &str = r#"
CREATE TABLE effect_cache (
    key TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE INDEX effect_cache_by_user ON effect_cache (user_id);
"#;

/// Version 3: the registry of trained adapters. Not tied to `users` by a
/// foreign key, because the shared adapter's owner is not a user.
const V3_ADAPTERS: &str = r#"
CREATE TABLE adapters (
    user_id TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version >= 1),
    path TEXT NOT NULL,
    objective TEXT NOT NULL,
    metrics TEXT NOT NULL CHECK (json_valid(metrics)),
    file_sha256 TEXT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    active INTEGER NOT NULL DEFAULT 0 CHECK (active IN (0, 1)),
    PRIMARY KEY (user_id, version)
) STRICT;

CREATE UNIQUE INDEX adapters_one_active ON adapters (user_id) WHERE active = 1;
"#;

/// Version 4: how many items each indexed term occurs in, so BM25 queries can
/// leave out words too common to rank by (see `store::retrieval`).
const V4_TERM_COUNTS: &str = r#"
CREATE VIRTUAL TABLE items_fts_terms USING fts5vocab (items_fts, 'row');
"#;

/// All migrations, oldest first.
pub(crate) fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(V1_HISTORY),
        M::up(V2_EFFECT_CACHE),
        M::up(V3_ADAPTERS),
        M::up(V4_TERM_COUNTS),
    ])
}

/// Brings the file at `path` (behind `conn`) to the newest schema.
pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let schema_error = |err: rusqlite_migration::Error| Error::StoreSchema {
        path: path.to_path_buf(),
        reason: match err {
            rusqlite_migration::Error::MigrationDefinition(_) => format!(
                "{err}; the file was written by a newer nextquill, open it with that version"
            ),
            other => other.to_string(),
        },
    };
    let migrations = migrations();
    let pending = migrations.pending_migrations(conn).map_err(schema_error)?;
    // Negative when the file is ahead of this build: `to_latest` reports that.
    if pending != 0 {
        tracing::info!(path = %path.display(), pending, "upgrading history store schema");
        migrations.to_latest(conn).map_err(schema_error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{HistoryQuery, HistoryStrategy, NewAdapter, Store, StoreOptions};

    #[test]
    fn migrations_are_valid() {
        migrations().validate().unwrap();
    }

    #[test]
    fn a_version_1_file_upgrades_and_keeps_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            migrations().to_version(&mut conn, 1).unwrap();
            conn.execute_batch(
                "INSERT INTO users (user_id) VALUES ('u1');
                 INSERT INTO items (user_id, item_id, timestamp, time_us, request, text, source)
                 VALUES ('u1', 'a', '2020-01-01T00:00:00Z', 1577836800000000,
                         'Product: kettle', 'boils water fast', 'v1'),
                        ('u1', 'b', '2020-01-02T00:00:00Z', 1577923200000000,
                         'Product: lamp', 'bright and warm light', 'v1');",
            )
            .unwrap();
            let version: i64 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(version, 1);
        }

        let store = Store::open(&path, StoreOptions::default()).unwrap();
        let conn = store.connection().unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 4);
        drop(conn);

        let items = store.items("u1").unwrap();
        let ids: Vec<&str> = items.iter().map(|i| i.item_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);

        // The v1 FTS index (filled by v1's triggers) serves BM25 after the upgrade.
        let query = HistoryQuery {
            strategy: HistoryStrategy::Bm25 {
                query: "kettle".into(),
            },
            max_items: 1,
            token_budget: None,
        };
        let chosen = store.history_for("u1", None, &query, &|_| 1).unwrap();
        assert_eq!(chosen[0].item_id, "a");

        // Tables of later migrations exist and work.
        store.put_effects("k", "u1", "a", b"{}").unwrap();
        assert_eq!(store.get_effects("k").unwrap().as_deref(), Some(&b"{}"[..]));
        let record = store
            .register_adapter(
                "u1",
                &NewAdapter {
                    path: dir.path().join("a.gguf"),
                    objective: "nextquill".into(),
                    metrics: serde_json::json!({}),
                    file_sha256: "0".repeat(64),
                    base_fingerprint: "base".into(),
                },
            )
            .unwrap();
        assert_eq!(record.version, 1);
    }

    #[test]
    fn a_file_from_a_newer_build_is_refused_with_a_schema_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("future.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = Store::open(&path, StoreOptions::default()).unwrap_err();
        assert!(matches!(err, Error::StoreSchema { .. }), "{err}");
    }
}
