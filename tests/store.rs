//! Whole flows of the history store on real files: concurrent use, messy and
//! real imports, retrieval that never looks ahead, and forgetting a user.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use nextquill::store::{
    Checkpoint, FileDisposal, HistoryQuery, HistoryStrategy, ImportOptions, NewAdapter, NewItem,
    Store, StoreOptions,
};
use nextquill::Error;
use proptest::prelude::*;

const USERS_JSONL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/amazon-reviews/users.jsonl"
);

fn words(text: &str) -> usize {
    text.split_whitespace().count()
}

fn item(user: &str, id: &str, timestamp: &str, text: &str) -> NewItem {
    NewItem {
        user_id: user.into(),
        item_id: id.into(),
        timestamp: timestamp.into(),
        request: format!("Product: thing {id}"),
        text: text.into(),
        source: "test".into(),
    }
}

/// Whether `needle` occurs anywhere in the file's bytes (false if no file).
fn file_contains(path: &Path, needle: &[u8]) -> bool {
    match std::fs::read(path) {
        Ok(bytes) => bytes.windows(needle.len()).any(|w| w == needle),
        Err(_) => false,
    }
}

#[test]
fn eight_threads_read_then_write_one_file_without_busy_errors() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        max_connections: 8,
        ..StoreOptions::default()
    };
    let store = Arc::new(Store::open(dir.path().join("history.db"), options).unwrap());

    let threads: Vec<_> = (0..8)
        .map(|thread| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                // Two threads per user, so reads and writes of one history interleave.
                let user = format!("u{}", thread % 4);
                let mut errors = Vec::new();
                let mut longest_history = 0;
                for round in 0..100 {
                    if round > 0 {
                        match store.history_for(&user, None, &HistoryQuery::default(), &words) {
                            Ok(history) => longest_history = longest_history.max(history.len()),
                            Err(e) => errors.push(e.to_string()),
                        }
                    }
                    let timestamp = format!("2024-01-01T00:{:02}:{:02}Z", round / 60, round % 60);
                    let new = item(&user, &format!("t{thread}-r{round}"), &timestamp, "text");
                    if let Err(e) = store.insert_item(&new) {
                        errors.push(e.to_string());
                    }
                }
                (errors, longest_history)
            })
        })
        .collect();

    for handle in threads {
        let (errors, longest_history) = handle.join().unwrap();
        assert!(errors.is_empty(), "errors: {errors:?}");
        assert_eq!(longest_history, 8);
    }
    let users = store.users().unwrap();
    let counts: Vec<(String, usize)> = users.into_iter().map(|u| (u.user_id, u.items)).collect();
    let expected: Vec<(String, usize)> = (0..4).map(|u| (format!("u{u}"), 200)).collect();
    assert_eq!(counts, expected);
}

/// A file with one line of each kind of damage among good lines.
fn messy_file(dir: &Path) -> (std::path::PathBuf, String) {
    let one_mib_text = "a".repeat(1024 * 1024);
    let over_limit_text = "b".repeat(4 * 1024 * 1024 + 1);
    let path = dir.join("messy.jsonl");
    let mut file = std::fs::File::create(&path).unwrap();
    let good_user = serde_json::json!({"user_id": "m1", "history": [
        {"id": "a", "timestamp": "2024-01-01T00:00:00Z", "input": "r", "output": "first"},
        {"id": "b", "timestamp": "2024-01-02T00:00:00Z", "input": "r", "output": "second"},
    ]});
    writeln!(file, "{good_user}").unwrap(); // line 1: 2 items
    writeln!(file, r#"{{"user_id": "m2", "history": [{{"id": "x""#).unwrap(); // 2: broken JSON
    let missing = serde_json::json!({"user_id": "m3", "history": [
        {"id": "a", "timestamp": "2024-01-01T00:00:00Z", "input": "r"},
    ]});
    writeln!(file, "{missing}").unwrap(); // 3: missing `output`
    file.write_all(b"{\"user_id\": \"m4\", \"item_id\": \"a\", \"timestamp\": \"2024-01-01T00:00:00Z\", \"input\": \"r\", \"output\": \"caf\xe9\"}\n")
        .unwrap(); // 4: Latin-1 byte, invalid UTF-8
    let big = serde_json::json!({"user_id": "m5", "item_id": "big",
        "timestamp": "2024-01-03T00:00:00Z", "input": "r", "output": one_mib_text});
    writeln!(file, "{big}").unwrap(); // 5: a 1 MiB text, good
    let oversize = serde_json::json!({"user_id": "m6", "item_id": "huge",
        "timestamp": "2024-01-03T00:00:00Z", "input": "r", "output": over_limit_text});
    writeln!(file, "{oversize}").unwrap(); // 6: over the 4 MiB limit
    let flat = serde_json::json!({"user_id": "m1", "item_id": "c",
        "timestamp": "2024-01-03T00:00:00Z", "input": "r", "output": "third"});
    write!(file, "{flat}").unwrap(); // 7: good, no final newline
    (path, one_mib_text)
}

#[test]
fn a_messy_file_imports_every_good_line_and_reports_the_bad_by_number() {
    let dir = tempfile::tempdir().unwrap();
    let (path, one_mib_text) = messy_file(dir.path());
    let store = Store::open(dir.path().join("h.db"), StoreOptions::default()).unwrap();

    let report = store.import_file(&path, &ImportOptions::default()).unwrap();
    assert_eq!(
        (report.imported, report.updated, report.unchanged),
        (4, 0, 0)
    );
    let bad: Vec<u64> = report.bad.iter().map(|b| b.line).collect();
    assert_eq!(bad, [2, 3, 4, 6], "{:?}", report.bad);
    assert!(report.bad[0].reason.starts_with("broken JSON"));
    assert_eq!(report.bad[1].reason, "history[0]: missing field `output`");
    assert!(report.bad[2].reason.starts_with("invalid UTF-8"));
    assert!(report.bad[3].reason.contains("over the 4194304-byte limit"));

    let big = store.item("m5", "big").unwrap().unwrap();
    assert_eq!(big.text, one_mib_text);
    assert_eq!(big.source, "messy.jsonl");
    let m1: Vec<String> = store
        .items("m1")
        .unwrap()
        .into_iter()
        .map(|i| i.text)
        .collect();
    assert_eq!(m1, ["first", "second", "third"]);

    // Importing the same file again changes nothing.
    let again = store.import_file(&path, &ImportOptions::default()).unwrap();
    assert_eq!((again.imported, again.updated, again.unchanged), (0, 0, 4));
    assert_eq!(again.bad, report.bad);
}

#[test]
fn the_real_data_imports_completely_and_round_trips() {
    // Count independently of the importer: users and items per user.
    let data = std::fs::read_to_string(USERS_JSONL).unwrap();
    let mut expected: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for line in data.lines() {
        let user: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = user["user_id"].as_str().unwrap().to_owned();
        expected.insert(id, user["history"].as_array().unwrap().clone());
    }
    let total_items: usize = expected.values().map(Vec::len).sum();
    assert_eq!(expected.len(), 150);

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("real.db"), StoreOptions::default()).unwrap();
    let mut progress_calls = 0;
    let report = store
        .import_file_with_progress(USERS_JSONL, &ImportOptions::default(), &mut |_| {
            progress_calls += 1
        })
        .unwrap();
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    assert_eq!(report.imported, total_items);
    assert!(progress_calls >= 2);

    let users = store.users().unwrap();
    let stored: BTreeMap<String, usize> = users.into_iter().map(|u| (u.user_id, u.items)).collect();
    let wanted: BTreeMap<String, usize> =
        expected.iter().map(|(u, h)| (u.clone(), h.len())).collect();
    assert_eq!(stored, wanted);

    // The export of a user is the file's line, plus each item's source.
    let (user, history) = expected.iter().nth(7).unwrap();
    let mut exported = Vec::new();
    store.export_user(user, &mut exported).unwrap();
    let exported: serde_json::Value = serde_json::from_slice(&exported).unwrap();
    let mut with_source = history.clone();
    for entry in &mut with_source {
        entry["source"] = "users.jsonl".into();
    }
    assert_eq!(exported["history"], serde_json::Value::Array(with_source));

    let again = store
        .import_file(USERS_JSONL, &ImportOptions::default())
        .unwrap();
    assert_eq!(
        (again.imported, again.updated, again.unchanged),
        (0, 0, total_items)
    );
}

#[test]
fn forget_leaves_no_trace_of_the_users_text_in_the_file() {
    const MARKER: &str = "qv7zk3marq9x";
    let dir = tempfile::tempdir().unwrap();
    let managed = dir.path().join("adapters");
    std::fs::create_dir(&managed).unwrap();
    let db = dir.path().join("forget.db");
    let options = StoreOptions {
        managed_adapter_dir: Some(managed.clone()),
        ..StoreOptions::default()
    };
    let store = Store::open(&db, options).unwrap();

    for n in 0..200 {
        let timestamp = format!("2024-01-01T{:02}:{:02}:00Z", n / 60, n % 60);
        let text = format!(
            "review {n} of the {MARKER} blender, {}",
            "filler ".repeat(n % 40)
        );
        store
            .insert_item(&item("victim", &format!("v{n}"), &timestamp, &text))
            .unwrap();
        let other = format!("a plain review number {n}");
        store
            .insert_item(&item("keeper", &format!("k{n}"), &timestamp, &other))
            .unwrap();
    }
    store
        .put_effects("victim-key", "victim", "v1", MARKER.as_bytes())
        .unwrap();
    let adapter_file = managed.join("victim-1.gguf");
    std::fs::write(&adapter_file, b"lora").unwrap();
    store
        .register_adapter(
            "victim",
            &NewAdapter {
                path: adapter_file.clone(),
                objective: "nextquill".into(),
                metrics: serde_json::json!({"note": MARKER}),
                file_sha256: "cd".repeat(32),
                base_fingerprint: "base".into(),
            },
        )
        .unwrap();

    // The test can fail: before forgetting, the marker is in the file.
    assert_eq!(store.checkpoint().unwrap(), Checkpoint::Complete);
    assert!(file_contains(&db, MARKER.as_bytes()));

    let report = store.forget("victim").unwrap();
    assert_eq!((report.items, report.effects), (200, 1));
    assert_eq!(report.checkpoint, Checkpoint::Complete);
    assert_eq!(report.adapters.len(), 1);
    assert_eq!(report.adapters[0].disposal, FileDisposal::Deleted);
    assert!(!adapter_file.exists());

    let wal = dir.path().join("forget.db-wal");
    assert!(
        !file_contains(&db, MARKER.as_bytes()),
        "marker left in the database file"
    );
    assert!(
        !file_contains(&wal, MARKER.as_bytes()),
        "marker left in the WAL"
    );
    assert!(
        !file_contains(&db, b"victim"),
        "user id left in the database file"
    );

    assert!(matches!(
        store.items("victim"),
        Err(Error::UnknownUser { .. })
    ));
    assert!(store.get_effects("victim-key").unwrap().is_none());
    assert!(store.adapters("victim").unwrap().is_empty());
    assert_eq!(store.items("keeper").unwrap().len(), 200);
    let query = HistoryQuery {
        strategy: HistoryStrategy::Bm25 {
            query: "plain review".into(),
        },
        ..HistoryQuery::default()
    };
    assert_eq!(
        store
            .history_for("keeper", None, &query, &words)
            .unwrap()
            .len(),
        8
    );
}

/// Reference selection: the `max_items` newest items strictly before `before`.
fn expected_recency(
    all: &[(i64, String)],
    before: &(i64, String),
    max_items: usize,
) -> Vec<String> {
    let mut older: Vec<&(i64, String)> = all.iter().filter(|key| *key < before).collect();
    older.sort();
    let start = older.len().saturating_sub(max_items);
    older[start..].iter().map(|(_, id)| id.clone()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn retrieval_for_an_item_never_returns_it_or_anything_newer(
        // Few distinct times, so ties (broken by item id) are common.
        times in proptest::collection::vec(0u32..6, 1..24),
        max_items in 1usize..10,
        words_of_query in proptest::sample::subsequence(vec!["tea", "kettle", "review", "blue"], 0..3),
    ) {
        let store = Store::open_in_memory().unwrap();
        let mut keys = Vec::new();
        for (n, day) in times.iter().enumerate() {
            // Ids not in time order: "i07" may be older than "i03".
            let id = format!("i{:02}", (n * 7) % 97);
            let timestamp = format!("2024-03-{:02}T08:00:00Z", day + 1);
            let text = ["tea review", "kettle", "blue tea kettle", "nothing"][n % 4];
            let stored = store.insert_item(&item("u", &id, &timestamp, text));
            prop_assert!(stored.is_ok());
            let time_us = store.item("u", &id).unwrap().unwrap().time_us;
            keys.push((time_us, id));
        }
        let bm25 = HistoryStrategy::Bm25 { query: words_of_query.join(" ") };
        for before in &keys {
            for strategy in [HistoryStrategy::Recency, bm25.clone()] {
                let query = HistoryQuery { strategy: strategy.clone(), max_items, token_budget: None };
                let chosen = store.history_for("u", Some(&before.1), &query, &words).unwrap();
                let chosen_keys: Vec<(i64, String)> =
                    chosen.iter().map(|i| (i.time_us, i.item_id.clone())).collect();
                prop_assert!(chosen_keys.iter().all(|key| key < before), "{chosen_keys:?} vs {before:?}");
                prop_assert!(chosen_keys.windows(2).all(|w| w[0] < w[1]), "not chronological");
                prop_assert!(chosen.len() <= max_items);
                if strategy == HistoryStrategy::Recency {
                    let ids: Vec<String> = chosen.into_iter().map(|i| i.item_id).collect();
                    prop_assert_eq!(ids, expected_recency(&keys, before, max_items));
                }
            }
        }
    }
}

#[cfg(feature = "encryption")]
#[test]
fn encryption_hides_the_text_and_a_wrong_key_is_a_typed_error() {
    use nextquill::store::StoreKey;
    const MARKER: &str = "zx9encrypted4marker";
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("secret.db");
    let keyed = |key: StoreKey| StoreOptions {
        key: Some(key),
        ..StoreOptions::default()
    };
    {
        let store = Store::open(&db, keyed(StoreKey::Raw([7; 32]))).unwrap();
        store
            .insert_item(&item("u1", "a", "2024-01-01T00:00:00Z", MARKER))
            .unwrap();
        store.checkpoint().unwrap();
    }
    assert!(db.exists());
    assert!(!file_contains(&db, MARKER.as_bytes()));
    assert!(!file_contains(&db, b"SQLite format 3"));

    let wrong = Store::open(&db, keyed(StoreKey::Raw([8; 32]))).unwrap_err();
    assert!(matches!(wrong, Error::StoreKey { .. }), "{wrong}");
    let none = Store::open(&db, StoreOptions::default()).unwrap_err();
    assert!(matches!(none, Error::StoreKey { .. }), "{none}");
    let passphrase = Store::open(&db, keyed(StoreKey::Passphrase("guess".into()))).unwrap_err();
    assert!(matches!(passphrase, Error::StoreKey { .. }), "{passphrase}");

    let store = Store::open(&db, keyed(StoreKey::Raw([7; 32]))).unwrap();
    assert_eq!(store.item("u1", "a").unwrap().unwrap().text, MARKER);
}
