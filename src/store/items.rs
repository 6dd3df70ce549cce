//! History items: what one is, how it is checked, written, read and deleted.

use rusqlite::{params, OptionalExtension, Row, Transaction};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{effects, write_transaction, SqlContext, Store, SHARED_ADAPTER_USER};
use crate::{Error, Result};

/// Longest user or item id, in bytes.
pub(crate) const MAX_ID_BYTES: usize = 256;

/// Default longest request or text, in bytes (4 MiB): far above any review or
/// mail, low enough that one broken line cannot fill the disk.
pub(crate) const DEFAULT_MAX_TEXT_BYTES: usize = 4 * 1024 * 1024;

/// Columns read into an [`Item`] (the user id is known to the caller).
pub(crate) const ITEM_COLUMNS: &str = "item_id, timestamp, time_us, request, text, source";

/// One history item as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The user who wrote [`text`](Item::text).
    pub user_id: String,
    /// The item's id, unique per user.
    pub item_id: String,
    /// When the user wrote it: RFC 3339 text exactly as imported.
    pub timestamp: String,
    /// The same instant as microseconds since the Unix epoch (UTC); history is
    /// ordered by this, ties broken by `item_id`.
    pub time_us: i64,
    /// What the text answers (the data's `input`: product, rating, title...).
    pub request: String,
    /// The user's own text (the data's `output`).
    pub text: String,
    /// Where the item came from (an import file name, an app feature).
    pub source: String,
}

impl Item {
    /// Reads a row of [`ITEM_COLUMNS`].
    pub(crate) fn from_row(user_id: &str, row: &Row<'_>) -> rusqlite::Result<Item> {
        Ok(Item {
            user_id: user_id.to_owned(),
            item_id: row.get(0)?,
            timestamp: row.get(1)?,
            time_us: row.get(2)?,
            request: row.get(3)?,
            text: row.get(4)?,
            source: row.get(5)?,
        })
    }
}

/// A history item to write; the store derives its sortable time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewItem {
    /// The user; not empty, at most 256 bytes, not [`SHARED_ADAPTER_USER`].
    pub user_id: String,
    /// The item's id, unique per user; not empty, at most 256 bytes.
    pub item_id: String,
    /// RFC 3339 date and time with offset, e.g. `2024-05-01T12:00:00Z`.
    pub timestamp: String,
    /// What the text answers; at most 4 MiB.
    pub request: String,
    /// The user's own text; at most 4 MiB.
    pub text: String,
    /// Where the item came from; free text, may be empty.
    pub source: String,
}

/// Which field of a [`NewItem`] failed its check, and why.
#[derive(Debug)]
pub(crate) struct ItemProblem {
    pub(crate) field: &'static str,
    pub(crate) reason: String,
}

impl NewItem {
    /// Checks the item and returns its time in microseconds since the epoch.
    pub(crate) fn check(&self, max_text_bytes: usize) -> Result<i64, ItemProblem> {
        let problem = |field, reason: String| ItemProblem { field, reason };
        for (field, id) in [("user_id", &self.user_id), ("item_id", &self.item_id)] {
            if id.trim().is_empty() {
                return Err(problem(field, "is empty".into()));
            }
            if id.len() > MAX_ID_BYTES {
                let reason = format!("is {} bytes, over the {MAX_ID_BYTES}-byte limit", id.len());
                return Err(problem(field, reason));
            }
        }
        if self.user_id == SHARED_ADAPTER_USER {
            let reason = format!("`{SHARED_ADAPTER_USER}` is reserved for shared adapters");
            return Err(problem("user_id", reason));
        }
        for (field, text) in [("request", &self.request), ("text", &self.text)] {
            if text.len() > max_text_bytes {
                let reason = format!(
                    "is {} bytes, over the {max_text_bytes}-byte limit",
                    text.len()
                );
                return Err(problem(field, reason));
            }
        }
        parse_time_us(&self.timestamp).map_err(|reason| problem("timestamp", reason))
    }
}

/// Parses RFC 3339 text into microseconds since the Unix epoch.
pub(crate) fn parse_time_us(timestamp: &str) -> Result<i64, String> {
    let instant = OffsetDateTime::parse(timestamp, &Rfc3339).map_err(|e| {
        format!("`{timestamp}` is not an RFC 3339 time like 2024-05-01T12:00:00Z ({e})")
    })?;
    // Years 1..9999 (all `time` parses) fit i64 microseconds many times over.
    Ok((instant.unix_timestamp_nanos() / 1_000) as i64)
}

/// What a write did to the stored item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The item was new.
    Inserted,
    /// An item with the same user and id existed with other content; it was replaced.
    Updated,
    /// The same item was already stored; nothing was written.
    Unchanged,
}

/// One user and the size of their history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSummary {
    /// The user id.
    pub user_id: String,
    /// Number of history items.
    pub items: usize,
    /// Timestamp of the newest item (as imported), `None` without items.
    pub latest: Option<String>,
}

/// Inserts or replaces one checked item inside `tx`; the caller drops the
/// user's effect cache when the outcome is not [`WriteOutcome::Unchanged`].
pub(crate) fn upsert(tx: &Transaction<'_>, item: &NewItem, time_us: i64) -> Result<WriteOutcome> {
    tx.prepare_cached("INSERT INTO users (user_id) VALUES (?1) ON CONFLICT (user_id) DO NOTHING")
        .and_then(|mut stmt| stmt.execute([&item.user_id]))
        .during("add user")?;

    let stored: Option<(i64, String, String, String, String)> = tx
        .prepare_cached(
            "SELECT id, timestamp, request, text, source FROM items
             WHERE user_id = ?1 AND item_id = ?2",
        )
        .and_then(|mut stmt| {
            stmt.query_row([&item.user_id, &item.item_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()
        })
        .during("read stored item")?;

    match stored {
        None => {
            tx.prepare_cached(
                "INSERT INTO items (user_id, item_id, timestamp, time_us, request, text, source)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    item.user_id,
                    item.item_id,
                    item.timestamp,
                    time_us,
                    item.request,
                    item.text,
                    item.source
                ])
            })
            .during("insert item")?;
            Ok(WriteOutcome::Inserted)
        }
        Some((_, timestamp, request, text, source))
            if timestamp == item.timestamp
                && request == item.request
                && text == item.text
                && source == item.source =>
        {
            Ok(WriteOutcome::Unchanged)
        }
        Some((id, ..)) => {
            tx.prepare_cached(
                "UPDATE items SET timestamp = ?2, time_us = ?3, request = ?4, text = ?5, source = ?6
                 WHERE id = ?1",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    id,
                    item.timestamp,
                    time_us,
                    item.request,
                    item.text,
                    item.source
                ])
            })
            .during("update item")?;
            Ok(WriteOutcome::Updated)
        }
    }
}

/// Fails with [`Error::UnknownUser`] unless `user` has a row.
pub(crate) fn require_user(conn: &rusqlite::Connection, user: &str) -> Result<()> {
    let known = conn
        .prepare_cached("SELECT 1 FROM users WHERE user_id = ?1")
        .and_then(|mut stmt| stmt.exists([user]))
        .during("look up user")?;
    if known {
        Ok(())
    } else {
        Err(Error::UnknownUser { user: user.into() })
    }
}

impl Store {
    /// Writes one history item (re-writing the same item changes nothing) and,
    /// if anything changed, drops the user's cached effects.
    pub fn insert_item(&self, item: &NewItem) -> Result<WriteOutcome> {
        let time_us = item
            .check(DEFAULT_MAX_TEXT_BYTES)
            .map_err(|p| Error::InvalidArgument {
                name: p.field,
                reason: p.reason,
            })?;
        let mut conn = self.connection()?;
        let tx = write_transaction(&mut conn)?;
        let outcome = upsert(&tx, item, time_us)?;
        if outcome != WriteOutcome::Unchanged {
            effects::drop_for_user(&tx, &item.user_id)?;
        }
        tx.commit().during("commit item")?;
        Ok(outcome)
    }

    /// Deletes one history item and the user's cached effects; returns the
    /// item, or `None` if it was not stored.
    pub fn delete_item(&self, user: &str, item_id: &str) -> Result<Option<Item>> {
        let mut conn = self.connection()?;
        let tx = write_transaction(&mut conn)?;
        let deleted = tx
            .prepare_cached(&format!(
                "DELETE FROM items WHERE user_id = ?1 AND item_id = ?2 RETURNING {ITEM_COLUMNS}"
            ))
            .and_then(|mut stmt| {
                stmt.query_row([user, item_id], |row| Item::from_row(user, row))
                    .optional()
            })
            .during("delete item")?;
        if deleted.is_some() {
            effects::drop_for_user(&tx, user)?;
        }
        tx.commit().during("commit item deletion")?;
        Ok(deleted)
    }

    /// One stored item, or `None`.
    pub fn item(&self, user: &str, item_id: &str) -> Result<Option<Item>> {
        let conn = self.connection()?;
        conn.prepare_cached(&format!(
            "SELECT {ITEM_COLUMNS} FROM items WHERE user_id = ?1 AND item_id = ?2"
        ))
        .and_then(|mut stmt| {
            stmt.query_row([user, item_id], |row| Item::from_row(user, row))
                .optional()
        })
        .during("read item")
    }

    /// All of a user's items, oldest first; [`Error::UnknownUser`] if the store
    /// has never seen the user.
    pub fn items(&self, user: &str) -> Result<Vec<Item>> {
        let conn = self.connection()?;
        require_user(&conn, user)?;
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {ITEM_COLUMNS} FROM items WHERE user_id = ?1 ORDER BY time_us, item_id"
            ))
            .during("read history")?;
        let rows = stmt
            .query_map([user], |row| Item::from_row(user, row))
            .during("read history")?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .during("read history")
    }

    /// Every user with the size of their history, ordered by user id.
    pub fn users(&self) -> Result<Vec<UserSummary>> {
        let conn = self.connection()?;
        // With max(), SQLite fills the bare `timestamp` column from the row
        // that holds the maximum, i.e. the newest item.
        let mut stmt = conn
            .prepare_cached(
                "SELECT u.user_id, count(i.id), i.timestamp, max(i.time_us)
                 FROM users AS u LEFT JOIN items AS i ON i.user_id = u.user_id
                 GROUP BY u.user_id ORDER BY u.user_id",
            )
            .during("list users")?;
        let rows = stmt
            .query_map([], |row| {
                Ok(UserSummary {
                    user_id: row.get(0)?,
                    items: row.get::<_, i64>(1)? as usize,
                    latest: row.get(2)?,
                })
            })
            .during("list users")?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .during("list users")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, timestamp: &str, text: &str) -> NewItem {
        NewItem {
            user_id: "u1".into(),
            item_id: id.into(),
            timestamp: timestamp.into(),
            request: "Product: tea".into(),
            text: text.into(),
            source: "test".into(),
        }
    }

    #[test]
    fn timestamps_with_offsets_sort_by_instant() {
        let utc = parse_time_us("2024-05-01T12:00:00Z").unwrap();
        assert_eq!(utc, 1_714_564_800_000_000);
        let earlier_in_utc = parse_time_us("2024-05-01T13:30:00.25+02:00").unwrap();
        assert_eq!(earlier_in_utc, utc - 30 * 60 * 1_000_000 + 250_000);
        assert!(parse_time_us("2024-05-01 12:00").is_err());
    }

    #[test]
    fn rewriting_an_item_is_unchanged_and_a_new_text_updates_it() {
        let store = Store::open_in_memory().unwrap();
        let first = item("a", "2024-05-01T12:00:00Z", "strong and smoky");
        assert_eq!(store.insert_item(&first).unwrap(), WriteOutcome::Inserted);
        assert_eq!(store.insert_item(&first).unwrap(), WriteOutcome::Unchanged);

        let edited = item("a", "2024-05-01T12:00:00Z", "mild after all");
        assert_eq!(store.insert_item(&edited).unwrap(), WriteOutcome::Updated);
        let stored = store.item("u1", "a").unwrap().unwrap();
        assert_eq!(stored.text, "mild after all");
        assert_eq!(stored.time_us, 1_714_564_800_000_000);
    }

    #[test]
    fn bad_items_are_refused_naming_the_field() {
        let store = Store::open_in_memory().unwrap();
        let cases = [
            (item("", "2024-05-01T12:00:00Z", "x"), "item_id"),
            (item("a", "yesterday", "x"), "timestamp"),
            (
                NewItem {
                    user_id: SHARED_ADAPTER_USER.into(),
                    ..item("a", "2024-05-01T12:00:00Z", "x")
                },
                "user_id",
            ),
        ];
        for (bad, field) in cases {
            match store.insert_item(&bad) {
                Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, field),
                other => panic!("expected an error on {field}, got {other:?}"),
            }
        }
        assert!(store.users().unwrap().is_empty());
    }

    #[test]
    fn delete_returns_the_item_and_users_count_what_is_left() {
        let store = Store::open_in_memory().unwrap();
        store
            .insert_item(&item("a", "2024-05-01T12:00:00Z", "one"))
            .unwrap();
        store
            .insert_item(&item("b", "2024-05-02T12:00:00Z", "two"))
            .unwrap();
        let removed = store.delete_item("u1", "b").unwrap().unwrap();
        assert_eq!(removed.text, "two");
        assert!(store.delete_item("u1", "b").unwrap().is_none());
        let users = store.users().unwrap();
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].items, 1);
        assert_eq!(users[0].latest.as_deref(), Some("2024-05-01T12:00:00Z"));
        assert!(matches!(
            store.items("nobody"),
            Err(Error::UnknownUser { .. })
        ));
    }
}
