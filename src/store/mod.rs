//! The user history store: one local SQLite file that holds everything personal.
//!
//! A [`Store`] keeps each user's history items (request, the user's own text,
//! timestamp, source) with a full-text index over them, the cache of computed
//! preference effects and the registry of trained adapters. It is `Send + Sync`:
//! an app shares one `Store` between its threads.
//!
//! - [`Store::import_file`] reads the per-user JSONL of `../shared/data` or flat
//!   CSV/JSONL item files; [`Store::export_user`] writes one user back out.
//! - [`Store::history_for`] chooses the history for a request (most recent, or
//!   most relevant by BM25), never an item newer than the one being predicted.
//! - [`Store::forget`] removes every trace of a user from the file.
//!
//! ```
//! use nextquill::store::{HistoryQuery, NewItem, Store};
//!
//! let store = Store::open_in_memory()?;
//! for (id, day, text) in [("a", "01", "first"), ("b", "02", "second"), ("c", "03", "third")] {
//!     store.insert_item(&NewItem {
//!         user_id: "u1".into(),
//!         item_id: id.into(),
//!         timestamp: format!("2024-05-{day}T10:00:00Z"),
//!         request: "Rating: 5/5".into(),
//!         text: text.into(),
//!         source: "doc".into(),
//!     })?;
//! }
//! let words = |s: &str| s.split_whitespace().count();
//! let history = store.history_for("u1", Some("c"), &HistoryQuery::default(), &words)?;
//! let texts: Vec<&str> = history.iter().map(|item| item.text.as_str()).collect();
//! assert_eq!(texts, ["first", "second"]);
//! # Ok::<(), nextquill::Error>(())
//! ```

mod adapters;
mod effects;
mod forget;
mod import;
mod items;
mod pool;
mod retrieval;
mod schema;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;

use crate::{Error, Result};

pub use adapters::{AdapterRecord, NewAdapter, SHARED_ADAPTER_USER};
pub use forget::{Checkpoint, FileDisposal, ForgetReport, RemovedAdapterFile};
pub use import::{BadLine, ImportFormat, ImportOptions, ImportProgress, ImportReport};
pub use items::{Item, NewItem, UserSummary, WriteOutcome};
pub use retrieval::{HistoryQuery, HistoryStrategy};

use pool::{ConnectionSpec, Pool};

/// The key of an encrypted store (feature `encryption`, SQLCipher).
///
/// Its `Debug` output never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreKey {
    /// A passphrase; SQLCipher derives the key from it with PBKDF2 each time a
    /// connection opens (hundreds of milliseconds per connection).
    Passphrase(String),
    /// A raw 256-bit key, used as is (no key derivation, cheap to open).
    Raw([u8; 32]),
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreKey::Passphrase(_) => f.write_str("StoreKey::Passphrase(<redacted>)"),
            StoreKey::Raw(_) => f.write_str("StoreKey::Raw(<redacted>)"),
        }
    }
}

impl StoreKey {
    /// The value of SQLCipher's `PRAGMA key` for this key.
    fn pragma_value(&self) -> String {
        match self {
            StoreKey::Passphrase(passphrase) => passphrase.clone(),
            StoreKey::Raw(bytes) => format!("x'{}'", hex::encode(bytes)),
        }
    }
}

/// How a [`Store`] opens its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// How long a call waits for another writer before failing with a busy
    /// error. Default 5 s.
    pub busy_timeout: Duration,
    /// Most SQLite connections the store keeps open at once, i.e. how many
    /// calls run inside SQLite at the same time; more callers wait their turn.
    /// Default 4. Must be at least 1.
    pub max_connections: usize,
    /// The SQLCipher key. `None` (the default) opens an unencrypted file. A key
    /// needs the `encryption` cargo feature; without it, a key is refused.
    pub key: Option<StoreKey>,
    /// A folder whose adapter files the store owns: [`Store::forget`] and
    /// [`Store::prune_adapters`] delete registered files that lie inside it and
    /// leave every other file to the caller. `None` (the default) deletes no
    /// file.
    pub managed_adapter_dir: Option<PathBuf>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            busy_timeout: Duration::from_secs(5),
            max_connections: 4,
            key: None,
            managed_adapter_dir: None,
        }
    }
}

impl StoreOptions {
    /// Checks that the options can be used.
    pub fn validate(&self) -> Result<()> {
        if self.max_connections == 0 {
            return Err(Error::InvalidArgument {
                name: "max_connections",
                reason: "must be at least 1".into(),
            });
        }
        if self.busy_timeout > Duration::from_secs(24 * 3600) {
            return Err(Error::InvalidArgument {
                name: "busy_timeout",
                reason: format!("{:?} is more than a day; use seconds", self.busy_timeout),
            });
        }
        if self.key.is_some() && !cfg!(feature = "encryption") {
            return Err(Error::InvalidArgument {
                name: "key",
                reason: "this build has no encryption; build nextquill with the `encryption` \
                         feature or open the store without a key"
                    .into(),
            });
        }
        if let Some(StoreKey::Passphrase(passphrase)) = &self.key {
            if passphrase.is_empty() {
                return Err(Error::InvalidArgument {
                    name: "key",
                    reason: "an empty passphrase would leave the file unencrypted".into(),
                });
            }
        }
        Ok(())
    }
}

/// The history store. Cheap to share: wrap it in an `Arc` and call it from any
/// thread.
pub struct Store {
    pool: Pool,
    managed_adapter_dir: Option<PathBuf>,
}

// The store is handed to app threads and to the FFI layer.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Store>();
};

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.pool.spec().display_path())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store at `path`, creating missing parent folders,
    /// and upgrades its schema to this build's version.
    ///
    /// The file runs in WAL mode with `synchronous = NORMAL`: a committed write
    /// survives a crash of the app; a power cut may lose the last commits, never
    /// corrupt the file.
    pub fn open(path: impl AsRef<Path>, options: StoreOptions) -> Result<Store> {
        options.validate()?;
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let spec = ConnectionSpec::file(path, options.busy_timeout, options.key.clone());
        Store::start(spec, options.max_connections, options.managed_adapter_dir)
    }

    /// Opens a private store in memory, gone when dropped; for tests and
    /// previews. It has one connection, so its calls run one at a time.
    pub fn open_in_memory() -> Result<Store> {
        let spec = ConnectionSpec::memory(StoreOptions::default().busy_timeout);
        Store::start(spec, 1, None)
    }

    fn start(
        spec: ConnectionSpec,
        max_connections: usize,
        managed_adapter_dir: Option<PathBuf>,
    ) -> Result<Store> {
        let mut first = spec.open_first()?;
        schema::migrate(&mut first, spec.display_path())?;
        tracing::debug!(
            path = %spec.display_path().display(),
            max_connections,
            "opened history store"
        );
        Ok(Store {
            pool: Pool::new(spec, first, max_connections),
            managed_adapter_dir,
        })
    }

    /// The database file, or `:memory:`.
    pub fn path(&self) -> &Path {
        self.pool.spec().display_path()
    }

    fn connection(&self) -> Result<pool::PooledConnection<'_>> {
        self.pool.get()
    }
}

/// Attaches what the store was doing to SQLite's errors.
trait SqlContext<T> {
    fn during(self, op: &'static str) -> Result<T>;
}

impl<T> SqlContext<T> for rusqlite::Result<T> {
    fn during(self, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Store { op, source })
    }
}

/// Opens a write transaction that takes the write lock up front, so two writers
/// queue on the busy timeout instead of failing when a read upgrades to a write.
fn write_transaction(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .during("begin write transaction")
}
