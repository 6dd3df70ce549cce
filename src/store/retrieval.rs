//! Choosing the history that goes into a prompt.
//!
//! The one rule that must never bend: when the request is itself a history
//! item (training, evaluation), only items strictly older than it may be
//! chosen, ordered by `(time_us, item_id)`. A newer text in the prompt would
//! leak the answer. Both strategies apply the bound in SQL.

use rusqlite::ToSql;

use super::items::{require_user, Item, ITEM_COLUMNS};
use super::{SqlContext, Store};
use crate::{Error, Result};

/// Most query words sent to the full-text index; a longer request keeps its
/// first distinct words. Every word adds a posting list to merge.
const MAX_QUERY_TERMS: usize = 32;

/// A query word in at most this many items is always matched, however common
/// it is in relative terms; see [`rankable_terms`].
const COMMON_TERM_ITEMS: i64 = 1000;

/// Items skipped for not fitting the remaining budget before the scan stops,
/// so a tiny budget does not tokenize a user's whole history.
const MAX_SKIPPED: usize = 32;

/// How history items are ranked before the budget is applied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HistoryStrategy {
    /// The most recent items first (the NextQuill paper's choice). Default.
    #[default]
    Recency,
    /// The items most relevant to `query` by BM25 over request and text
    /// (FTS5, Porter stemming). Only items sharing a word with the query are
    /// chosen, so fewer than `max_items` may come back; a query without any
    /// word falls back to [`HistoryStrategy::Recency`].
    Bm25 {
        /// The request text to match (any text: it is split into words and
        /// quoted, so FTS5 syntax in it has no effect).
        query: String,
    },
}

/// What history to choose for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    /// How candidates are ranked. Default [`HistoryStrategy::Recency`].
    pub strategy: HistoryStrategy,
    /// Most items to choose. Default 8 (the NextQuill paper). At least 1.
    pub max_items: usize,
    /// Most tokens the chosen items may take together, counting each item's
    /// request plus text (not the prompt template around them). `None` means
    /// no limit. Default `Some(1024)`.
    pub token_budget: Option<usize>,
}

impl Default for HistoryQuery {
    fn default() -> Self {
        HistoryQuery {
            strategy: HistoryStrategy::Recency,
            max_items: 8,
            token_budget: Some(1024),
        }
    }
}

impl HistoryQuery {
    /// Checks that the query can be run.
    pub fn validate(&self) -> Result<()> {
        if self.max_items == 0 {
            return Err(Error::InvalidArgument {
                name: "max_items",
                reason: "must be at least 1; ask for the counterfactual prompt to use no history"
                    .into(),
            });
        }
        Ok(())
    }
}

/// Quotes `text` as one FTS5 string, so no character in it is syntax.
fn fts_quote(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}

/// The distinct lowercase words of `query`, at most [`MAX_QUERY_TERMS`].
fn query_terms(query: &str) -> Vec<String> {
    let mut terms: Vec<String> = Vec::new();
    for word in query.split(|c: char| !c.is_alphanumeric()) {
        let word = word.to_lowercase();
        if !word.is_empty() && !terms.contains(&word) {
            terms.push(word);
            if terms.len() == MAX_QUERY_TERMS {
                break;
            }
        }
    }
    terms
}

/// The FTS5 expression for "this user's items sharing one of `terms`", or
/// `None` when there is no term.
///
/// The user filter only narrows the index scan; SQL still checks the exact
/// user id, since an id like `a-b` is the phrase `a b` to the tokenizer.
fn fts_expression(user: &str, terms: &[String]) -> Option<String> {
    if terms.is_empty() {
        return None;
    }
    let any_term: Vec<String> = terms.iter().map(|t| fts_quote(t)).collect();
    let mut expression = format!("{{request text}} : ({})", any_term.join(" OR "));
    if user.chars().any(char::is_alphanumeric) {
        expression = format!("user_id : {} AND {expression}", fts_quote(user));
    }
    Some(expression)
}

/// `terms` without those too common to rank by: in more than
/// [`COMMON_TERM_ITEMS`] items and in more than an eighth of all items.
///
/// A query costs about one BM25 evaluation per matching item, and such words
/// carry little weight (BM25's IDF is below 1.9 against 7 to 9 for a word in a
/// handful of items; FTS5 clamps it to 1e-6 past half): on a history of
/// 10,000 reviews, "product", "rating" and the "3" of "3/5" matched every item
/// or a fifth of them and made a query take 29 ms. Leaving them out of the
/// match means an item that shares only such words with the request is no
/// longer a candidate. Histories under 1,000 items keep every word. A word is
/// looked up in the index's vocabulary as written and as stemmed; one found
/// under neither form is kept.
fn rankable_terms(conn: &rusqlite::Connection, terms: Vec<String>) -> Result<Vec<String>> {
    let items: i64 = conn
        .prepare_cached("SELECT count(*) FROM items")
        .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
        .during("count indexed items")?;
    let mut count = conn
        .prepare_cached("SELECT doc FROM items_fts_terms WHERE term = ?1")
        .during("look up query words")?;
    let mut documents = |term: &str| -> Result<i64> {
        rusqlite::OptionalExtension::optional(count.query_row([term], |row| row.get(0)))
            .map(Option::unwrap_or_default)
            .during("look up query words")
    };
    let mut kept = Vec::with_capacity(terms.len());
    for term in terms {
        let stem = crate::porter::porter_stem(&term);
        let docs = documents(&stem)?.max(if stem == term { 0 } else { documents(&term)? });
        if docs <= COMMON_TERM_ITEMS || 8 * docs <= items {
            kept.push(term);
        }
    }
    Ok(kept)
}

impl Store {
    /// Chooses `user`'s history for a request, oldest first.
    ///
    /// With `before = Some(item_id)` (the request is that history item), only
    /// items strictly older than it are candidates: earlier `time_us`, or the
    /// same `time_us` and a smaller `item_id`. With `None` (a new request),
    /// every item is. Candidates are taken in the strategy's order while they
    /// fit: at most `max_items`, and within `token_budget` as measured by
    /// `count_tokens` on each item's request and text. An item larger than
    /// what is left of the budget is skipped and the scan goes on to the next
    /// candidate (after 32 skipped items it stops).
    ///
    /// Errors: [`Error::UnknownUser`], [`Error::UnknownItem`] for a `before`
    /// the user does not have.
    pub fn history_for(
        &self,
        user: &str,
        before: Option<&str>,
        query: &HistoryQuery,
        count_tokens: &dyn Fn(&str) -> usize,
    ) -> Result<Vec<Item>> {
        query.validate()?;
        let conn = self.connection()?;
        require_user(&conn, user)?;

        // Times are years 1..=9999 (RFC 3339), so (i64::MAX, "") is above all.
        let (bound_time, bound_item) = match before {
            None => (i64::MAX, String::new()),
            Some(item) => {
                let time = conn
                    .prepare_cached("SELECT time_us FROM items WHERE user_id = ?1 AND item_id = ?2")
                    .and_then(|mut stmt| {
                        rusqlite::OptionalExtension::optional(
                            stmt.query_row([user, item], |row| row.get::<_, i64>(0)),
                        )
                    })
                    .during("look up the request's item")?
                    .ok_or_else(|| Error::UnknownItem {
                        user: user.into(),
                        item: item.into(),
                    })?;
                (time, item.to_owned())
            }
        };

        let expression = match &query.strategy {
            HistoryStrategy::Recency => None,
            HistoryStrategy::Bm25 { query: text } => {
                let terms = rankable_terms(&conn, query_terms(text))?;
                let expression = fts_expression(user, &terms);
                if expression.is_none() {
                    tracing::debug!(
                        user,
                        "BM25 query has no word rare enough to rank by; choosing by recency"
                    );
                }
                expression
            }
        };
        // The scan below reads at most this many rows: a LIMIT lets SQLite keep
        // the best few instead of sorting every match.
        let most_rows = (query.max_items + MAX_SKIPPED) as i64;
        let (sql, params): (String, Vec<&dyn ToSql>) = match &expression {
            None => (
                format!(
                    "SELECT {ITEM_COLUMNS} FROM items
                     WHERE user_id = ?1 AND (time_us, item_id) < (?2, ?3)
                     ORDER BY time_us DESC, item_id DESC"
                ),
                vec![&user, &bound_time, &bound_item],
            ),
            Some(expression) => (
                BM25_SQL.to_owned(),
                vec![&user, &bound_time, &bound_item, expression, &most_rows],
            ),
        };

        let mut stmt = conn.prepare_cached(&sql).during("choose history")?;
        let mut rows = stmt.query(params.as_slice()).during("choose history")?;
        let mut chosen = Vec::new();
        let mut remaining = query.token_budget;
        let mut skipped = 0;
        while chosen.len() < query.max_items && remaining != Some(0) && skipped < MAX_SKIPPED {
            let Some(row) = rows.next().during("choose history")? else {
                break;
            };
            let item = Item::from_row(user, row).during("choose history")?;
            let cost = count_tokens(&item.request) + count_tokens(&item.text);
            match remaining {
                Some(left) if cost > left => {
                    skipped += 1;
                    continue;
                }
                Some(left) => remaining = Some(left - cost),
                None => {}
            }
            chosen.push(item);
        }

        chosen.sort_by(|a, b| (a.time_us, &a.item_id).cmp(&(b.time_us, &b.item_id)));
        Ok(chosen)
    }
}

/// At most `?5` items of user `?1` older than `(?2, ?3)` that match the FTS5
/// expression `?4`, best BM25 first.
///
/// CROSS JOIN keeps the full-text match as the outer loop: with a plain JOIN
/// SQLite walked the user's items and evaluated the MATCH once per item
/// (28 s for 10,000 items instead of 28 ms).
const BM25_SQL: &str = "SELECT i.item_id, i.timestamp, i.time_us, i.request, i.text, i.source
     FROM items_fts CROSS JOIN items AS i ON i.id = items_fts.rowid
     WHERE items_fts MATCH ?4 AND i.user_id = ?1 AND (i.time_us, i.item_id) < (?2, ?3)
     ORDER BY bm25(items_fts, 0.0, 1.0, 1.0), i.time_us DESC, i.item_id DESC
     LIMIT ?5";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewItem;

    #[test]
    fn bm25_query_drives_from_the_full_text_match_not_from_every_item() {
        // Regression: the planner looped over the user's items and ran the
        // MATCH once per item, 1000 times slower on a long history.
        let store = store_with(&[("a", "2024-01-01T00:00:00Z", "kettle", "boils fast")]);
        let conn = store.connection().unwrap();
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {BM25_SQL}"))
            .unwrap();
        let plan: Vec<String> = stmt
            .query_map(("u1", 0i64, "z", "kettle", 40i64), |row| {
                row.get::<_, String>(3)
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(plan[0].contains("items_fts"), "outer loop: {plan:?}");
    }

    fn store_with(items: &[(&str, &str, &str, &str)]) -> Store {
        let store = Store::open_in_memory().unwrap();
        for (id, timestamp, request, text) in items {
            store
                .insert_item(&NewItem {
                    user_id: "u1".into(),
                    item_id: (*id).into(),
                    timestamp: (*timestamp).into(),
                    request: (*request).into(),
                    text: (*text).into(),
                    source: String::new(),
                })
                .unwrap();
        }
        store
    }

    fn ids(items: &[Item]) -> Vec<&str> {
        items.iter().map(|i| i.item_id.as_str()).collect()
    }

    fn words(text: &str) -> usize {
        text.split_whitespace().count()
    }

    #[test]
    fn quoting_neutralizes_fts5_syntax() {
        assert_eq!(
            fts_expression("u1", &query_terms("NEAR(\"a\" b*) OR -c")),
            Some(
                r#"user_id : "u1" AND {request text} : ("near" OR "a" OR "b" OR "or" OR "c")"#
                    .into()
            )
        );
        assert_eq!(fts_expression("u1", &query_terms(" *** ")), None);
        assert_eq!(fts_quote(r#"say "hi""#), r#""say ""hi""""#);
    }

    #[test]
    fn recency_takes_the_newest_older_items_with_ties_broken_by_id() {
        let store = store_with(&[
            ("a", "2024-01-01T00:00:00Z", "r", "one"),
            ("b", "2024-01-02T00:00:00Z", "r", "two"),
            ("c2", "2024-01-03T00:00:00Z", "r", "three"),
            ("c1", "2024-01-03T00:00:00Z", "r", "three too"),
            ("d", "2024-01-04T00:00:00Z", "r", "four"),
        ]);
        let query = HistoryQuery {
            max_items: 2,
            ..HistoryQuery::default()
        };
        let chosen = store.history_for("u1", Some("c2"), &query, &words).unwrap();
        assert_eq!(ids(&chosen), ["b", "c1"]);
        let chosen = store.history_for("u1", Some("c1"), &query, &words).unwrap();
        assert_eq!(ids(&chosen), ["a", "b"]);
        let chosen = store.history_for("u1", None, &query, &words).unwrap();
        assert_eq!(ids(&chosen), ["c2", "d"]);
        let chosen = store.history_for("u1", Some("a"), &query, &words).unwrap();
        assert!(chosen.is_empty());
    }

    #[test]
    fn the_budget_skips_items_that_do_not_fit() {
        let store = store_with(&[
            ("a", "2024-01-01T00:00:00Z", "r", "tiny"),
            (
                "b",
                "2024-01-02T00:00:00Z",
                "r",
                "a much longer text of many words",
            ),
            ("c", "2024-01-03T00:00:00Z", "r", "short one"),
        ]);
        // Costs in words (request + text): a 2, b 8, c 3.
        let query = HistoryQuery {
            token_budget: Some(6),
            ..HistoryQuery::default()
        };
        let chosen = store.history_for("u1", None, &query, &words).unwrap();
        assert_eq!(ids(&chosen), ["a", "c"]);
    }

    #[test]
    fn bm25_leaves_out_words_in_most_of_a_long_history() {
        let mut rows: Vec<(String, String, String, String)> = (0..1200)
            .map(|n| {
                (
                    format!("i{n:04}"),
                    format!("2024-01-01T{:02}:{:02}:00Z", n / 60, n % 60),
                    "Product: mug".to_owned(),
                    format!("mug number {n}"),
                )
            })
            .collect();
        rows[7].2 = "Product: kettle".into();
        let rows: Vec<(&str, &str, &str, &str)> = rows
            .iter()
            .map(|(a, b, c, d)| (a.as_str(), b.as_str(), c.as_str(), d.as_str()))
            .collect();
        let store = store_with(&rows);
        let bm25 = |query: &str| HistoryQuery {
            strategy: HistoryStrategy::Bm25 {
                query: query.into(),
            },
            max_items: 3,
            token_budget: None,
        };
        // "product" is in every item: only the kettle item shares a rankable word.
        let chosen = store
            .history_for("u1", None, &bm25("Product: kettle"), &words)
            .unwrap();
        assert_eq!(ids(&chosen), ["i0007"]);
        // No rankable word at all: recency, as for a query without words.
        let chosen = store
            .history_for("u1", None, &bm25("Product: mug"), &words)
            .unwrap();
        assert_eq!(ids(&chosen), ["i1197", "i1198", "i1199"]);
    }

    #[test]
    fn bm25_ranks_by_relevance_and_never_looks_ahead() {
        let store = store_with(&[
            (
                "a",
                "2024-01-01T00:00:00Z",
                "Product: green tea",
                "grassy tea, lovely tea",
            ),
            (
                "b",
                "2024-01-02T00:00:00Z",
                "Product: hammer",
                "solid hammer",
            ),
            (
                "c",
                "2024-01-03T00:00:00Z",
                "Product: teapot",
                "pours tea well",
            ),
            (
                "d",
                "2024-01-04T00:00:00Z",
                "Product: black tea",
                "tea tea tea",
            ),
        ]);
        let query = HistoryQuery {
            strategy: HistoryStrategy::Bm25 {
                query: "Which teas?".into(),
            },
            max_items: 2,
            token_budget: None,
        };
        let chosen = store.history_for("u1", Some("d"), &query, &words).unwrap();
        assert_eq!(ids(&chosen), ["a", "c"]);
        let chosen = store.history_for("u1", None, &query, &words).unwrap();
        assert_eq!(ids(&chosen), ["a", "d"]);
        assert!(matches!(
            store.history_for("u1", Some("zz"), &query, &words),
            Err(Error::UnknownItem { .. })
        ));
    }
}
