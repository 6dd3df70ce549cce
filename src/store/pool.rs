//! The store's connections: how one is opened and configured, and the small
//! pool that lends them to callers.
//!
//! Why a pool of whole connections rather than one `Mutex<Connection>`: SQLite
//! in WAL mode lets readers run beside a writer only when they use separate
//! connections, and writers queue on SQLite's own busy timeout once each write
//! begins IMMEDIATE. A single shared connection would serialize every read
//! behind every import. The pool is a few lines over `Mutex` + `Condvar`
//! instead of an external pool crate, because the pool crates for rusqlite pin
//! their own rusqlite version and we need nothing but checkout and return.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode};

use super::StoreKey;
use crate::{Error, Result};

/// Prepared statements kept per connection; the store uses about twenty.
const STATEMENT_CACHE: usize = 32;

/// Where connections point and how each is configured.
#[derive(Debug)]
pub(crate) struct ConnectionSpec {
    /// `None` for the private in-memory database.
    file: Option<PathBuf>,
    display_path: PathBuf,
    busy_timeout: Duration,
    key: Option<StoreKey>,
}

impl ConnectionSpec {
    pub(crate) fn file(path: PathBuf, busy_timeout: Duration, key: Option<StoreKey>) -> Self {
        ConnectionSpec {
            display_path: path.clone(),
            file: Some(path),
            busy_timeout,
            key,
        }
    }

    pub(crate) fn memory(busy_timeout: Duration) -> Self {
        ConnectionSpec {
            file: None,
            display_path: PathBuf::from(":memory:"),
            busy_timeout,
            key: None,
        }
    }

    pub(crate) fn display_path(&self) -> &Path {
        &self.display_path
    }

    /// Opens the first connection, which also switches the file to WAL (a
    /// setting stored in the file, so later connections inherit it).
    pub(crate) fn open_first(&self) -> Result<Connection> {
        let conn = self.open_more()?;
        if self.file.is_some() {
            let mode: String = conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
                .map_err(|e| self.open_error(e))?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(
                    path = %self.display_path.display(),
                    mode,
                    "history store could not switch to WAL; concurrent readers will wait for writers"
                );
            }
        }
        Ok(conn)
    }

    /// Opens and configures one connection.
    pub(crate) fn open_more(&self) -> Result<Connection> {
        let conn = match &self.file {
            Some(path) => Connection::open(path),
            None => Connection::open_in_memory(),
        }
        .map_err(|e| self.open_error(e))?;

        if let Some(key) = &self.key {
            conn.pragma_update(None, "key", key.pragma_value())
                .map_err(|e| self.open_error(e))?;
        }
        // SQLCipher only notices a wrong key on the first read of the file.
        conn.query_row("SELECT count(*) FROM sqlite_schema", [], |row| {
            row.get::<_, i64>(0)
        })
        .map_err(|e| self.open_error(e))?;

        conn.busy_timeout(self.busy_timeout)
            .map_err(|e| self.open_error(e))?;
        for (pragma, value) in [
            ("foreign_keys", "ON"),
            // Deleted text is overwritten with zeros, so forgetting a user
            // leaves no copy in free pages.
            ("secure_delete", "ON"),
            // In WAL mode NORMAL only skips the fsync per commit; the file
            // stays consistent after a power cut.
            ("synchronous", "NORMAL"),
        ] {
            conn.pragma_update(None, pragma, value)
                .map_err(|e| self.open_error(e))?;
        }
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }

    fn open_error(&self, err: rusqlite::Error) -> Error {
        let path = self.display_path.clone();
        if err.sqlite_error_code() == Some(ErrorCode::NotADatabase) {
            if self.key.is_some() || cfg!(feature = "encryption") {
                return Error::StoreKey { path };
            }
            return Error::StoreOpen {
                path,
                reason: "the file is not a SQLite database, or is encrypted (open it with its \
                         key in a build with the `encryption` feature)"
                    .into(),
            };
        }
        Error::StoreOpen {
            path,
            reason: format!("{err}; check that the path is a writable file"),
        }
    }
}

struct PoolState {
    idle: Vec<Connection>,
    /// Connections in existence, idle or lent.
    open: usize,
}

/// Lends connections, opening new ones up to `max`; callers beyond that wait
/// for a connection to come back.
pub(crate) struct Pool {
    spec: ConnectionSpec,
    state: Mutex<PoolState>,
    returned: Condvar,
    max: usize,
}

impl Pool {
    pub(crate) fn new(spec: ConnectionSpec, first: Connection, max: usize) -> Pool {
        Pool {
            spec,
            state: Mutex::new(PoolState {
                idle: vec![first],
                open: 1,
            }),
            returned: Condvar::new(),
            max,
        }
    }

    pub(crate) fn spec(&self) -> &ConnectionSpec {
        &self.spec
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // The state is a list and a count that stay consistent even if a
        // holder panicked, so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn get(&self) -> Result<PooledConnection<'_>> {
        let mut state = self.lock();
        loop {
            if let Some(conn) = state.idle.pop() {
                return Ok(PooledConnection {
                    pool: self,
                    conn: Some(conn),
                });
            }
            if state.open < self.max {
                state.open += 1;
                break;
            }
            state = self
                .returned
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        drop(state);

        // Opened outside the lock: with a key, opening runs a key derivation.
        match self.spec.open_more() {
            Ok(conn) => Ok(PooledConnection {
                pool: self,
                conn: Some(conn),
            }),
            Err(err) => {
                self.lock().open -= 1;
                self.returned.notify_one();
                Err(err)
            }
        }
    }
}

/// A connection lent by the pool; it goes back when dropped.
pub(crate) struct PooledConnection<'a> {
    pool: &'a Pool,
    conn: Option<Connection>,
}

impl Deref for PooledConnection<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
            .as_ref()
            .expect("a lent connection is only taken on drop")
    }
}

impl DerefMut for PooledConnection<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn
            .as_mut()
            .expect("a lent connection is only taken on drop")
    }
}

impl Drop for PooledConnection<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.lock().idle.push(conn);
            self.pool.returned.notify_one();
        }
    }
}
