//! The cache of computed preference effects.
//!
//! Effects cost two model passes per item, so the effect stage stores them
//! under a key it derives (model fingerprint, item, history selection, prompt
//! template). The store treats the payload as opaque bytes (JSON by
//! convention) and drops a user's entries whenever their history changes, as
//! the chosen history of any item may have changed with it.

use rusqlite::{params, OptionalExtension, Transaction};

use super::{write_transaction, SqlContext, Store};
use crate::Result;

/// Deletes every cached effect of `user` inside `tx`; returns how many.
pub(crate) fn drop_for_user(tx: &Transaction<'_>, user: &str) -> Result<usize> {
    tx.prepare_cached("DELETE FROM effect_cache WHERE user_id = ?1")
        .and_then(|mut stmt| stmt.execute([user]))
        .during("drop cached effects")
}

impl Store {
    /// The cached payload under `key`, or `None`.
    pub fn get_effects(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let conn = self.connection()?;
        conn.prepare_cached("SELECT payload FROM effect_cache WHERE key = ?1")
            .and_then(|mut stmt| stmt.query_row([key], |row| row.get(0)).optional())
            .during("read cached effects")
    }

    /// Stores `payload` under `key` for the user's item, replacing an older
    /// payload with that key. The entry lives until the user's history changes
    /// or the user is forgotten.
    pub fn put_effects(&self, key: &str, user: &str, item_id: &str, payload: &[u8]) -> Result<()> {
        let mut conn = self.connection()?;
        let tx = write_transaction(&mut conn)?;
        tx.prepare_cached(
            "INSERT INTO effect_cache (key, user_id, item_id, payload) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (key) DO UPDATE SET
                 user_id = excluded.user_id, item_id = excluded.item_id,
                 payload = excluded.payload,
                 created = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        )
        .and_then(|mut stmt| stmt.execute(params![key, user, item_id, payload]))
        .during("cache effects")?;
        tx.commit().during("commit cached effects")
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{NewItem, Store};

    fn item(id: &str, text: &str) -> NewItem {
        NewItem {
            user_id: "u1".into(),
            item_id: id.into(),
            timestamp: "2024-01-01T00:00:00Z".into(),
            request: "r".into(),
            text: text.into(),
            source: String::new(),
        }
    }

    #[test]
    fn a_history_write_drops_only_that_users_effects() {
        let store = Store::open_in_memory().unwrap();
        store.insert_item(&item("a", "first")).unwrap();
        store.put_effects("k1", "u1", "a", br#"{"e":1}"#).unwrap();
        store.put_effects("k1", "u1", "a", br#"{"e":2}"#).unwrap();
        store.put_effects("k2", "u2", "x", br#"{"e":3}"#).unwrap();
        assert_eq!(store.get_effects("k1").unwrap().unwrap(), br#"{"e":2}"#);

        // Re-writing the same item changes no history, so the cache stays.
        store.insert_item(&item("a", "first")).unwrap();
        assert!(store.get_effects("k1").unwrap().is_some());

        store.insert_item(&item("b", "second")).unwrap();
        assert!(store.get_effects("k1").unwrap().is_none());
        assert!(store.get_effects("k2").unwrap().is_some());

        store.put_effects("k1", "u1", "a", b"{}").unwrap();
        store.delete_item("u1", "b").unwrap();
        assert!(store.get_effects("k1").unwrap().is_none());
    }
}
