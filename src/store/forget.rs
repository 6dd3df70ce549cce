//! Forgetting a user, and the WAL checkpoint that makes the forgetting real.
//!
//! Every connection runs with `PRAGMA secure_delete = ON` and the full-text
//! index with FTS5's `secure-delete` option, so deleted text is overwritten in
//! the database pages rather than left in free space or in stale index
//! segments. What remains is the write-ahead log, which still holds the pages
//! as they were before the delete until a checkpoint copies the new pages back
//! and truncates the log.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::{effects, write_transaction, SqlContext, Store};
use crate::Result;

/// What became of a removed adapter's file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileDisposal {
    /// The file was inside the managed adapter folder and is deleted.
    Deleted,
    /// The file was inside the managed adapter folder but did not exist.
    AlreadyGone,
    /// The file is outside the managed folder (or none is set): the caller
    /// deletes it.
    LeftForCaller,
    /// The file is inside the managed folder but could not be deleted; the
    /// caller should retry. Holds the I/O error's text.
    DeleteFailed(String),
}

/// An adapter file whose registry row was removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedAdapterFile {
    /// The path the registry held.
    pub path: PathBuf,
    /// Whether the store deleted it.
    pub disposal: FileDisposal,
}

/// How a WAL checkpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// Every page is back in the database file and the log is empty.
    Complete,
    /// A reader kept part of the log in use past the busy timeout; those pages
    /// (possibly with deleted text) stay in the log until the next checkpoint.
    Blocked,
}

/// What [`Store::forget`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgetReport {
    /// The user that was forgotten.
    pub user_id: String,
    /// History items removed.
    pub items: usize,
    /// Cached effect entries removed.
    pub effects: usize,
    /// Adapter files the registry held for the user.
    pub adapters: Vec<RemovedAdapterFile>,
    /// Whether the checkpoint after the delete emptied the log.
    pub checkpoint: Checkpoint,
}

/// Deletes the files that lie inside `managed_dir` and reports on all of them.
pub(crate) fn dispose_adapter_files(
    managed_dir: Option<&Path>,
    paths: impl IntoIterator<Item = PathBuf>,
) -> Vec<RemovedAdapterFile> {
    // Compared canonically, so `managed/../elsewhere` is not mistaken for managed.
    let managed_dir = managed_dir.and_then(|dir| dir.canonicalize().ok());
    paths
        .into_iter()
        .map(|path| {
            let disposal = match &managed_dir {
                Some(dir) if is_inside(&path, dir) => match std::fs::remove_file(&path) {
                    Ok(()) => FileDisposal::Deleted,
                    Err(e) if e.kind() == ErrorKind::NotFound => FileDisposal::AlreadyGone,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "adapter file not deleted");
                        FileDisposal::DeleteFailed(e.to_string())
                    }
                },
                _ => FileDisposal::LeftForCaller,
            };
            RemovedAdapterFile { path, disposal }
        })
        .collect()
}

/// Whether `path` (which may no longer exist) lies inside the canonical `dir`.
fn is_inside(path: &Path, dir: &Path) -> bool {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => return false,
    };
    match parent.canonicalize() {
        Ok(parent) => parent.starts_with(dir) && path.file_name().is_some(),
        Err(_) => false,
    }
}

fn checkpoint_on(conn: &Connection) -> Result<Checkpoint> {
    // TRUNCATE waits (on the busy timeout) for readers of the old log, then
    // empties the log file to zero bytes.
    let busy: i64 = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get(0))
        .during("checkpoint the write-ahead log")?;
    Ok(if busy == 0 {
        Checkpoint::Complete
    } else {
        Checkpoint::Blocked
    })
}

impl Store {
    /// Removes every row of `user` (history, index entries, cached effects,
    /// adapter registry rows) with secure delete, then checkpoints the
    /// write-ahead log so no deleted text stays in the database's files.
    ///
    /// Adapter files inside [`StoreOptions::managed_adapter_dir`](super::StoreOptions)
    /// are deleted; every other registered file is returned as
    /// [`FileDisposal::LeftForCaller`] for the caller to delete. Forgetting an
    /// unknown user succeeds and removes nothing. If the report says
    /// [`Checkpoint::Blocked`], call [`Store::checkpoint`] again once readers
    /// are done.
    pub fn forget(&self, user: &str) -> Result<ForgetReport> {
        let mut conn = self.connection()?;
        let tx = write_transaction(&mut conn)?;
        let paths = tx
            .prepare_cached("DELETE FROM adapters WHERE user_id = ?1 RETURNING path")
            .and_then(|mut stmt| {
                let paths = stmt
                    .query_map([user], |row| row.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>();
                paths
            })
            .during("forget adapters")?;
        let effects = effects::drop_for_user(&tx, user)?;
        let items = tx
            .execute("DELETE FROM items WHERE user_id = ?1", [user])
            .during("forget history")?;
        tx.execute("DELETE FROM users WHERE user_id = ?1", [user])
            .during("forget user")?;
        tx.commit().during("commit forgetting")?;

        let checkpoint = checkpoint_on(&conn)?;
        drop(conn);
        let adapters = dispose_adapter_files(
            self.managed_adapter_dir.as_deref(),
            paths.into_iter().map(PathBuf::from),
        );
        tracing::info!(
            user,
            items,
            effects,
            adapters = adapters.len(),
            ?checkpoint,
            "forgot user"
        );
        Ok(ForgetReport {
            user_id: user.into(),
            items,
            effects,
            adapters,
            checkpoint,
        })
    }

    /// Copies the write-ahead log into the database file and truncates the
    /// log, waiting up to the busy timeout for readers.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let conn = self.connection()?;
        checkpoint_on(&conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_inside_the_managed_folder_count_as_managed() {
        let dir = tempfile::tempdir().unwrap();
        let managed = dir.path().join("adapters");
        std::fs::create_dir(&managed).unwrap();
        let inside = managed.join("a.gguf");
        std::fs::write(&inside, b"x").unwrap();
        let escaping = managed.join("..").join("b.gguf");
        std::fs::write(&escaping, b"x").unwrap();
        let missing = managed.join("gone.gguf");

        let report = dispose_adapter_files(
            Some(&managed),
            [inside.clone(), escaping.clone(), missing.clone()],
        );
        let disposals: Vec<FileDisposal> = report.into_iter().map(|r| r.disposal).collect();
        assert_eq!(
            disposals,
            [
                FileDisposal::Deleted,
                FileDisposal::LeftForCaller,
                FileDisposal::AlreadyGone
            ]
        );
        assert!(!inside.exists());
        assert!(escaping.exists());

        let unmanaged = dispose_adapter_files(None, [escaping.clone()]);
        assert_eq!(unmanaged[0].disposal, FileDisposal::LeftForCaller);
    }
}
