//! The registry of trained adapters: which files exist for a user, in which
//! version, and which one generation should apply.
//!
//! The registry holds rows only; the adapter files are written by the adapter
//! stage. A user has versions 1, 2, ... and at most one active version (a
//! partial unique index enforces it). An adapter trained for many users is
//! registered under [`SHARED_ADAPTER_USER`].

use std::path::PathBuf;

use rusqlite::types::Type;
use rusqlite::{params, OptionalExtension, Row};

use super::forget::{dispose_adapter_files, RemovedAdapterFile};
use super::{write_transaction, SqlContext, Store};
use crate::{Error, Result};

/// The reserved owner of adapters shared by many users. No history item can
/// belong to it; `forget(SHARED_ADAPTER_USER)` removes the shared adapters.
pub const SHARED_ADAPTER_USER: &str = "@shared";

const ADAPTER_COLUMNS: &str = "user_id, version, path, objective, metrics, file_sha256, \
                               base_fingerprint, created, active";

/// An adapter file to register.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAdapter {
    /// The adapter file (GGUF LoRA); its path must be valid UTF-8.
    pub path: PathBuf,
    /// The training objective, e.g. `nextquill` or `sft`; not empty.
    pub objective: String,
    /// Training and evaluation numbers, any JSON value.
    pub metrics: serde_json::Value,
    /// SHA-256 of the file, 64 hex digits.
    pub file_sha256: String,
    /// Fingerprint of the base model the adapter was trained on; not empty.
    pub base_fingerprint: String,
}

/// A registered adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterRecord {
    /// The owner: a user id or [`SHARED_ADAPTER_USER`].
    pub user_id: String,
    /// Version number, 1 for the user's first adapter, then increasing.
    pub version: i64,
    /// The adapter file.
    pub path: PathBuf,
    /// The training objective.
    pub objective: String,
    /// Training and evaluation numbers.
    pub metrics: serde_json::Value,
    /// SHA-256 of the file, hex.
    pub file_sha256: String,
    /// Fingerprint of the base model.
    pub base_fingerprint: String,
    /// When it was registered, RFC 3339 UTC.
    pub created: String,
    /// Whether generation for the owner applies this adapter.
    pub active: bool,
}

impl AdapterRecord {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<AdapterRecord> {
        let metrics: String = row.get(4)?;
        let metrics = serde_json::from_str(&metrics)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(4, Type::Text, Box::new(e)))?;
        Ok(AdapterRecord {
            user_id: row.get(0)?,
            version: row.get(1)?,
            path: PathBuf::from(row.get::<_, String>(2)?),
            objective: row.get(3)?,
            metrics,
            file_sha256: row.get(5)?,
            base_fingerprint: row.get(6)?,
            created: row.get(7)?,
            active: row.get(8)?,
        })
    }
}

impl NewAdapter {
    fn check(&self) -> Result<&str> {
        let invalid = |name, reason: &str| Error::InvalidArgument {
            name,
            reason: reason.into(),
        };
        let path = self
            .path
            .to_str()
            .ok_or_else(|| invalid("path", "adapter paths must be valid UTF-8"))?;
        if self.objective.trim().is_empty() {
            return Err(invalid(
                "objective",
                "is empty; name the training objective",
            ));
        }
        if self.base_fingerprint.trim().is_empty() {
            return Err(invalid("base_fingerprint", "is empty"));
        }
        if self.file_sha256.len() != 64 || !self.file_sha256.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(invalid("file_sha256", "must be 64 hex digits"));
        }
        Ok(path)
    }
}

fn check_owner(user: &str) -> Result<()> {
    if user.trim().is_empty() {
        return Err(Error::InvalidArgument {
            name: "user_id",
            reason: "is empty".into(),
        });
    }
    Ok(())
}

impl Store {
    /// Registers an adapter file as the owner's next version, inactive; make it
    /// the one in use with [`Store::activate_adapter`].
    pub fn register_adapter(&self, user: &str, adapter: &NewAdapter) -> Result<AdapterRecord> {
        check_owner(user)?;
        let path = adapter.check()?;
        let metrics = adapter.metrics.to_string();
        let mut conn = self.connection()?;
        let tx = write_transaction(&mut conn)?;
        let record = tx
            .prepare_cached(&format!(
                "INSERT INTO adapters
                     (user_id, version, path, objective, metrics, file_sha256, base_fingerprint)
                 SELECT ?1, coalesce(max(version), 0) + 1, ?2, ?3, ?4, ?5, ?6
                 FROM adapters WHERE user_id = ?1
                 RETURNING {ADAPTER_COLUMNS}"
            ))
            .and_then(|mut stmt| {
                stmt.query_row(
                    params![
                        user,
                        path,
                        adapter.objective,
                        metrics,
                        adapter.file_sha256.to_ascii_lowercase(),
                        adapter.base_fingerprint
                    ],
                    AdapterRecord::from_row,
                )
            })
            .during("register adapter")?;
        tx.commit().during("commit adapter")?;
        tracing::info!(user, version = record.version, path, "registered adapter");
        Ok(record)
    }

    /// The owner's adapters, oldest version first.
    pub fn adapters(&self, user: &str) -> Result<Vec<AdapterRecord>> {
        let conn = self.connection()?;
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {ADAPTER_COLUMNS} FROM adapters WHERE user_id = ?1 ORDER BY version"
            ))
            .during("list adapters")?;
        let rows = stmt
            .query_map([user], AdapterRecord::from_row)
            .during("list adapters")?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .during("list adapters")
    }

    /// The owner's active adapter, or `None` (generation then runs the base model).
    pub fn active_adapter(&self, user: &str) -> Result<Option<AdapterRecord>> {
        let conn = self.connection()?;
        conn.prepare_cached(&format!(
            "SELECT {ADAPTER_COLUMNS} FROM adapters WHERE user_id = ?1 AND active = 1"
        ))
        .and_then(|mut stmt| stmt.query_row([user], AdapterRecord::from_row).optional())
        .during("read active adapter")
    }

    /// Makes `version` the owner's only active adapter, in one transaction;
    /// [`Error::UnknownAdapter`] if it is not registered.
    pub fn activate_adapter(&self, user: &str, version: i64) -> Result<()> {
        let mut conn = self.connection()?;
        let tx = write_transaction(&mut conn)?;
        tx.prepare_cached("UPDATE adapters SET active = 0 WHERE user_id = ?1 AND active = 1")
            .and_then(|mut stmt| stmt.execute([user]))
            .during("deactivate adapters")?;
        let changed = tx
            .prepare_cached("UPDATE adapters SET active = 1 WHERE user_id = ?1 AND version = ?2")
            .and_then(|mut stmt| stmt.execute(params![user, version]))
            .during("activate adapter")?;
        if changed == 0 {
            // Dropping the transaction rolls the deactivation back.
            return Err(Error::UnknownAdapter {
                user: user.into(),
                version,
            });
        }
        tx.commit().during("commit adapter activation")?;
        tracing::info!(user, version, "activated adapter");
        Ok(())
    }

    /// Leaves the owner with no active adapter.
    pub fn deactivate_adapters(&self, user: &str) -> Result<()> {
        let mut conn = self.connection()?;
        let tx = write_transaction(&mut conn)?;
        tx.prepare_cached("UPDATE adapters SET active = 0 WHERE user_id = ?1 AND active = 1")
            .and_then(|mut stmt| stmt.execute([user]))
            .during("deactivate adapters")?;
        tx.commit().during("commit adapter deactivation")
    }

    /// Removes all but the owner's `keep_last` newest versions (at least 1),
    /// never the active one, and returns the removed files: those inside
    /// [`StoreOptions::managed_adapter_dir`](super::StoreOptions) are deleted,
    /// the others are left for the caller.
    pub fn prune_adapters(&self, user: &str, keep_last: usize) -> Result<Vec<RemovedAdapterFile>> {
        if keep_last == 0 {
            // Keeping the newest row keeps version numbers from being reused.
            return Err(Error::InvalidArgument {
                name: "keep_last",
                reason: "must be at least 1; use forget to remove every adapter".into(),
            });
        }
        let mut conn = self.connection()?;
        let tx = write_transaction(&mut conn)?;
        let paths = tx
            .prepare_cached(
                "DELETE FROM adapters
                 WHERE user_id = ?1 AND active = 0 AND version NOT IN (
                     SELECT version FROM adapters WHERE user_id = ?1
                     ORDER BY version DESC LIMIT ?2)
                 RETURNING path",
            )
            .and_then(|mut stmt| {
                let paths = stmt
                    .query_map(params![user, keep_last as i64], |row| {
                        row.get::<_, String>(0)
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>();
                paths
            })
            .during("prune adapters")?;
        tx.commit().during("commit adapter pruning")?;
        tracing::info!(user, removed = paths.len(), keep_last, "pruned adapters");
        Ok(dispose_adapter_files(
            self.managed_adapter_dir.as_deref(),
            paths.into_iter().map(PathBuf::from),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FileDisposal, StoreOptions};

    fn adapter(path: PathBuf) -> NewAdapter {
        NewAdapter {
            path,
            objective: "nextquill".into(),
            metrics: serde_json::json!({"rouge1": 0.19}),
            file_sha256: "ab".repeat(32),
            base_fingerprint: "smollm2-q4_1".into(),
        }
    }

    #[test]
    fn versions_count_up_and_exactly_one_is_active() {
        let store = Store::open_in_memory().unwrap();
        for expected in 1..=3 {
            let record = store
                .register_adapter("u1", &adapter(format!("/a/{expected}.gguf").into()))
                .unwrap();
            assert_eq!(record.version, expected);
            assert!(!record.active);
        }
        assert!(store.active_adapter("u1").unwrap().is_none());

        store.activate_adapter("u1", 2).unwrap();
        store.activate_adapter("u1", 3).unwrap();
        let active: Vec<i64> = store
            .adapters("u1")
            .unwrap()
            .iter()
            .filter(|a| a.active)
            .map(|a| a.version)
            .collect();
        assert_eq!(active, [3]);
        assert_eq!(
            store.active_adapter("u1").unwrap().unwrap().metrics,
            serde_json::json!({"rouge1": 0.19})
        );

        // A failed activation keeps the previous one active.
        let err = store.activate_adapter("u1", 9).unwrap_err();
        assert!(matches!(err, Error::UnknownAdapter { version: 9, .. }));
        assert_eq!(store.active_adapter("u1").unwrap().unwrap().version, 3);

        store.deactivate_adapters("u1").unwrap();
        assert!(store.active_adapter("u1").unwrap().is_none());
    }

    #[test]
    fn prune_keeps_the_newest_and_the_active_and_deletes_only_managed_files() {
        let dir = tempfile::tempdir().unwrap();
        let managed = dir.path().join("adapters");
        std::fs::create_dir(&managed).unwrap();
        let options = StoreOptions {
            managed_adapter_dir: Some(managed.clone()),
            ..StoreOptions::default()
        };
        let store = Store::open(dir.path().join("s.db"), options).unwrap();

        let outside = dir.path().join("outside.gguf");
        std::fs::write(&outside, b"v1").unwrap();
        store
            .register_adapter("u1", &adapter(outside.clone()))
            .unwrap();
        for version in 2..=5 {
            let path = managed.join(format!("v{version}.gguf"));
            std::fs::write(&path, b"lora").unwrap();
            store.register_adapter("u1", &adapter(path)).unwrap();
        }
        store.activate_adapter("u1", 2).unwrap();

        let removed = store.prune_adapters("u1", 2).unwrap();
        let mut removed: Vec<(PathBuf, FileDisposal)> =
            removed.into_iter().map(|r| (r.path, r.disposal)).collect();
        removed.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            removed,
            [
                (managed.join("v3.gguf"), FileDisposal::Deleted),
                (outside.clone(), FileDisposal::LeftForCaller),
            ]
        );
        assert!(outside.exists());
        assert!(!managed.join("v3.gguf").exists());

        let versions: Vec<i64> = store
            .adapters("u1")
            .unwrap()
            .iter()
            .map(|a| a.version)
            .collect();
        assert_eq!(versions, [2, 4, 5]);
        assert!(store.prune_adapters("u1", 0).is_err());
    }
}
