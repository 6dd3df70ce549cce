//! Import of history files and export of one user's history.
//!
//! Real exports are messy: one broken line must not cost the rest of the file.
//! Each line (or CSV record) is checked on its own; a bad one is reported with
//! its line number and reason, and every good one is written. Items are keyed
//! by (user id, item id), so importing a file again changes nothing.
//!
//! Formats:
//! - JSONL, one user per line: `{"user_id": .., "history": [{"id", "timestamp",
//!   "input", "output", "source"?}, ..]}` (the format of `../shared/data`,
//!   and what [`Store::export_user`] writes). A line is imported whole or not
//!   at all.
//! - JSONL, one item per line: `{"user_id", "item_id" (or "id"), "timestamp",
//!   "input", "output", "source"?}`. Both JSONL kinds may be mixed in a file.
//! - CSV with a header row naming `user_id,item_id,timestamp,input,output`
//!   and optionally `source`, in any order.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::items::{upsert, NewItem, DEFAULT_MAX_TEXT_BYTES};
use super::{effects, write_transaction, SqlContext, Store};
use crate::{Error, Result};

/// The layout of an import file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImportFormat {
    /// CSV for a `.csv` file name, JSONL otherwise (and for readers). Default.
    #[default]
    Auto,
    /// JSON lines: per-user lines with a `history` list, or single items.
    Jsonl,
    /// CSV with a header row.
    Csv,
}

/// How an import reads its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    /// The file layout. Default [`ImportFormat::Auto`].
    pub format: ImportFormat,
    /// Longest request or text accepted, in bytes. Default 4 MiB; a longer one
    /// makes its line bad.
    pub max_text_bytes: usize,
    /// Longest JSONL line accepted, in bytes; a longer line is reported bad
    /// without being held in memory. Default 64 MiB. Not applied to CSV, whose
    /// records may span lines; there only `max_text_bytes` applies.
    pub max_line_bytes: usize,
    /// The `source` of items whose line names none. Default `None`: the
    /// file's name, or `import` for a reader.
    pub default_source: Option<String>,
    /// Items written per transaction. Default 1000: large enough to be fast,
    /// small enough that other writers wait well under the busy timeout.
    pub batch_items: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            format: ImportFormat::Auto,
            max_text_bytes: DEFAULT_MAX_TEXT_BYTES,
            max_line_bytes: 64 * 1024 * 1024,
            default_source: None,
            batch_items: 1000,
        }
    }
}

impl ImportOptions {
    /// Checks that the options can be used.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("max_text_bytes", self.max_text_bytes),
            ("max_line_bytes", self.max_line_bytes),
            ("batch_items", self.batch_items),
        ] {
            if value == 0 {
                return Err(Error::InvalidArgument {
                    name,
                    reason: "must be at least 1".into(),
                });
            }
        }
        Ok(())
    }
}

/// A line that was not imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based line number in the file (for CSV, where the record starts).
    pub line: u64,
    /// Why it was refused, naming the field.
    pub reason: String,
}

/// What an import did. Counts are items, not lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Items that were new.
    pub imported: usize,
    /// Items that replaced a stored item with the same ids but other content.
    pub updated: usize,
    /// Items already stored exactly so.
    pub unchanged: usize,
    /// Lines that were refused, in file order.
    pub bad: Vec<BadLine>,
}

/// How far an import has come; passed to the progress callback after each
/// written batch and at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportProgress {
    /// Lines (or CSV records) read so far.
    pub lines: u64,
    /// Bytes read so far.
    pub bytes: u64,
    /// Size of the file, when known.
    pub total_bytes: Option<u64>,
    /// Items written so far (imported + updated + unchanged).
    pub items: usize,
    /// Bad lines so far.
    pub bad: usize,
}

#[derive(Deserialize)]
struct UserLine {
    user_id: String,
    history: Vec<Value>,
}

#[derive(Deserialize, Serialize)]
struct HistoryEntry {
    id: String,
    timestamp: String,
    input: String,
    output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<String>,
}

#[derive(Deserialize)]
struct ItemLine {
    user_id: String,
    #[serde(alias = "id")]
    item_id: String,
    timestamp: String,
    input: String,
    output: String,
    #[serde(default)]
    source: Option<String>,
}

#[derive(Serialize)]
struct ExportLine<'a> {
    user_id: &'a str,
    history: Vec<HistoryEntry>,
}

/// The name a [`NewItem`] field has in import files.
fn file_field(field: &'static str) -> &'static str {
    match field {
        "request" => "input",
        "text" => "output",
        other => other,
    }
}

/// Checks an item read from a file; the reason names the file's field.
fn checked(item: NewItem, max_text_bytes: usize) -> Result<(NewItem, i64), String> {
    match item.check(max_text_bytes) {
        Ok(time_us) => Ok((item, time_us)),
        Err(problem) => Err(format!(
            "`{}` {}",
            file_field(problem.field),
            problem.reason
        )),
    }
}

/// Parses one JSONL line into its checked items, or the reason it is bad.
fn parse_json_line(
    line: &[u8],
    default_source: &str,
    max_text_bytes: usize,
) -> Result<Vec<(NewItem, i64)>, String> {
    let text = std::str::from_utf8(line)
        .map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
    let value: Value = serde_json::from_str(text).map_err(|e| format!("broken JSON: {e}"))?;
    let Value::Object(object) = &value else {
        return Err("not a JSON object".into());
    };

    if !object.contains_key("history") {
        let line: ItemLine = serde_json::from_value(value).map_err(|e| e.to_string())?;
        let item = NewItem {
            user_id: line.user_id,
            item_id: line.item_id,
            timestamp: line.timestamp,
            request: line.input,
            text: line.output,
            source: line.source.unwrap_or_else(|| default_source.to_owned()),
        };
        return Ok(vec![checked(item, max_text_bytes)?]);
    }

    let user: UserLine = serde_json::from_value(value).map_err(|e| e.to_string())?;
    let mut items = Vec::with_capacity(user.history.len());
    for (index, entry) in user.history.into_iter().enumerate() {
        let entry: HistoryEntry =
            serde_json::from_value(entry).map_err(|e| format!("history[{index}]: {e}"))?;
        let item = NewItem {
            user_id: user.user_id.clone(),
            item_id: entry.id,
            timestamp: entry.timestamp,
            request: entry.input,
            text: entry.output,
            source: entry.source.unwrap_or_else(|| default_source.to_owned()),
        };
        items.push(checked(item, max_text_bytes).map_err(|r| format!("history[{index}]: {r}"))?);
    }
    Ok(items)
}

/// How reading one line ended.
enum LineRead {
    Line,
    TooLong,
    End,
}

/// Reads up to the next `\n` into `line` (without it); a line over `max`
/// bytes is skipped to its end and not kept. Returns the bytes consumed.
fn read_line_limited(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<(LineRead, u64)> {
    line.clear();
    let mut consumed = 0u64;
    let mut too_long = false;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            let read = match (consumed, too_long) {
                (0, _) => LineRead::End,
                (_, true) => LineRead::TooLong,
                (_, false) => LineRead::Line,
            };
            return Ok((read, consumed));
        }
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        if !too_long {
            if line.len() + chunk.len() > max {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = newline.map_or(available.len(), |i| i + 1);
        reader.consume(used);
        consumed += used as u64;
        if newline.is_some() {
            let read = if too_long {
                LineRead::TooLong
            } else {
                LineRead::Line
            };
            return Ok((read, consumed));
        }
    }
}

/// Collects checked items and writes them in batches, one transaction each.
struct BatchWriter<'s> {
    store: &'s Store,
    pending: Vec<(NewItem, i64)>,
    batch_items: usize,
    report: ImportReport,
    progress: ImportProgress,
}

impl BatchWriter<'_> {
    /// Adds one line's items; a line is never split across transactions.
    fn push_line(
        &mut self,
        items: Vec<(NewItem, i64)>,
        on_progress: &mut dyn FnMut(&ImportProgress),
    ) -> Result<()> {
        self.pending.extend(items);
        if self.pending.len() >= self.batch_items {
            self.flush(on_progress)?;
        }
        Ok(())
    }

    fn bad(&mut self, line: u64, reason: String) {
        tracing::debug!(line, reason, "import line refused");
        self.report.bad.push(BadLine { line, reason });
        self.progress.bad += 1;
    }

    fn flush(&mut self, on_progress: &mut dyn FnMut(&ImportProgress)) -> Result<()> {
        if !self.pending.is_empty() {
            let mut conn = self.store.connection()?;
            let tx = write_transaction(&mut conn)?;
            let mut changed_users = BTreeSet::new();
            for (item, time_us) in self.pending.drain(..) {
                match upsert(&tx, &item, time_us)? {
                    super::WriteOutcome::Inserted => self.report.imported += 1,
                    super::WriteOutcome::Updated => self.report.updated += 1,
                    super::WriteOutcome::Unchanged => {
                        self.report.unchanged += 1;
                        continue;
                    }
                }
                changed_users.insert(item.user_id);
            }
            for user in &changed_users {
                effects::drop_for_user(&tx, user)?;
            }
            tx.commit().during("commit imported items")?;
        }
        self.progress.items = self.report.imported + self.report.updated + self.report.unchanged;
        on_progress(&self.progress);
        Ok(())
    }
}

impl Store {
    /// Imports a history file (see the module docs for the formats).
    ///
    /// Bad lines are listed in the report and skipped; a failure of the file
    /// itself (missing, unreadable, a CSV without the needed columns) or of
    /// SQLite is an error, with the batches before it already written.
    pub fn import_file(
        &self,
        path: impl AsRef<Path>,
        options: &ImportOptions,
    ) -> Result<ImportReport> {
        self.import_file_with_progress(path, options, &mut |_| {})
    }

    /// [`Store::import_file`] that reports its progress after each batch.
    pub fn import_file_with_progress(
        &self,
        path: impl AsRef<Path>,
        options: &ImportOptions,
        on_progress: &mut dyn FnMut(&ImportProgress),
    ) -> Result<ImportReport> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let total_bytes = file.metadata().ok().map(|m| m.len());
        let format = match options.format {
            ImportFormat::Auto => {
                let is_csv = path
                    .extension()
                    .is_some_and(|ext| ext.eq_ignore_ascii_case("csv"));
                if is_csv {
                    ImportFormat::Csv
                } else {
                    ImportFormat::Jsonl
                }
            }
            chosen => chosen,
        };
        let source = match &options.default_source {
            Some(source) => source.clone(),
            None => path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_else(|| "import".into()),
        };
        let options = ImportOptions {
            format,
            default_source: Some(source),
            ..options.clone()
        };
        let report = self
            .import_reader_inner(BufReader::new(file), &options, total_bytes, on_progress)
            .map_err(|err| match err {
                Error::Import { reason, .. } => Error::Import {
                    path: path.to_path_buf(),
                    reason,
                },
                Error::Io { source, .. } => Error::io(path, source),
                other => other,
            })?;
        tracing::info!(
            path = %path.display(),
            imported = report.imported,
            updated = report.updated,
            unchanged = report.unchanged,
            bad = report.bad.len(),
            "imported history file"
        );
        Ok(report)
    }

    /// Imports from any reader; [`ImportFormat::Auto`] reads JSONL here.
    pub fn import_reader(
        &self,
        reader: impl Read,
        options: &ImportOptions,
        on_progress: &mut dyn FnMut(&ImportProgress),
    ) -> Result<ImportReport> {
        self.import_reader_inner(BufReader::new(reader), options, None, on_progress)
    }

    fn import_reader_inner(
        &self,
        reader: impl BufRead,
        options: &ImportOptions,
        total_bytes: Option<u64>,
        on_progress: &mut dyn FnMut(&ImportProgress),
    ) -> Result<ImportReport> {
        options.validate()?;
        let source = options.default_source.as_deref().unwrap_or("import");
        let mut writer = BatchWriter {
            store: self,
            pending: Vec::new(),
            batch_items: options.batch_items,
            report: ImportReport::default(),
            progress: ImportProgress {
                lines: 0,
                bytes: 0,
                total_bytes,
                items: 0,
                bad: 0,
            },
        };
        match options.format {
            ImportFormat::Auto | ImportFormat::Jsonl => {
                import_jsonl(reader, options, source, &mut writer, on_progress)?
            }
            ImportFormat::Csv => import_csv(reader, options, source, &mut writer, on_progress)?,
        }
        writer.flush(on_progress)?;
        Ok(writer.report)
    }

    /// Writes `user`'s history as one JSONL line in the per-user import
    /// format (oldest first, with each item's `source`), so it imports back
    /// unchanged. Returns the number of items written.
    pub fn export_user(&self, user: &str, out: &mut dyn Write) -> Result<usize> {
        let history: Vec<HistoryEntry> = self
            .items(user)?
            .into_iter()
            .map(|item| HistoryEntry {
                id: item.item_id,
                timestamp: item.timestamp,
                input: item.request,
                output: item.text,
                source: Some(item.source),
            })
            .collect();
        let count = history.len();
        let line = ExportLine {
            user_id: user,
            history,
        };
        let export_error = |e: std::io::Error| Error::io(format!("<export of user {user}>"), e);
        serde_json::to_writer(&mut *out, &line).map_err(|e| export_error(e.into()))?;
        out.write_all(b"\n").map_err(export_error)?;
        Ok(count)
    }
}

fn import_jsonl(
    mut reader: impl BufRead,
    options: &ImportOptions,
    source: &str,
    writer: &mut BatchWriter<'_>,
    on_progress: &mut dyn FnMut(&ImportProgress),
) -> Result<()> {
    let mut line = Vec::new();
    loop {
        let (read, consumed) = read_line_limited(&mut reader, &mut line, options.max_line_bytes)
            .map_err(|e| Error::io("<import input>", e))?;
        writer.progress.bytes += consumed;
        let number = writer.progress.lines + 1;
        match read {
            LineRead::End => return Ok(()),
            LineRead::TooLong => {
                writer.progress.lines = number;
                let reason = format!("line is over the {}-byte limit", options.max_line_bytes);
                writer.bad(number, reason);
                continue;
            }
            LineRead::Line => writer.progress.lines = number,
        }

        let mut content = line.as_slice();
        if number == 1 {
            content = content.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(content);
        }
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if content.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parse_json_line(content, source, options.max_text_bytes) {
            Ok(items) => writer.push_line(items, on_progress)?,
            Err(reason) => writer.bad(number, reason),
        }
    }
}

/// Column positions of a CSV import file.
struct CsvColumns {
    user_id: usize,
    item_id: usize,
    timestamp: usize,
    input: usize,
    output: usize,
    source: Option<usize>,
}

impl CsvColumns {
    fn from_header(header: &csv::ByteRecord) -> Result<CsvColumns> {
        let names: Vec<String> = header
            .iter()
            .map(|name| String::from_utf8_lossy(name).trim().to_ascii_lowercase())
            .collect();
        let find = |wanted: &[&str]| names.iter().position(|n| wanted.contains(&n.as_str()));
        let require = |wanted: &[&str]| {
            find(wanted).ok_or_else(|| Error::Import {
                path: "<import input>".into(),
                reason: format!(
                    "the CSV header has no `{}` column; the header must name \
                     user_id,item_id,timestamp,input,output and optionally source",
                    wanted[0]
                ),
            })
        };
        Ok(CsvColumns {
            user_id: require(&["user_id"])?,
            item_id: require(&["item_id", "id"])?,
            timestamp: require(&["timestamp"])?,
            input: require(&["input", "request"])?,
            output: require(&["output", "text"])?,
            source: find(&["source"]),
        })
    }

    fn item(
        &self,
        record: &csv::ByteRecord,
        width: usize,
        default_source: &str,
        max_text_bytes: usize,
    ) -> Result<(NewItem, i64), String> {
        if record.len() != width {
            return Err(format!("has {} fields, the header {width}", record.len()));
        }
        let field = |index: usize, name: &str| -> Result<String, String> {
            let bytes = record.get(index).unwrap_or_default();
            String::from_utf8(bytes.to_vec()).map_err(|e| {
                let at = e.utf8_error().valid_up_to();
                format!("`{name}` has invalid UTF-8 at byte {at}")
            })
        };
        let item = NewItem {
            user_id: field(self.user_id, "user_id")?,
            item_id: field(self.item_id, "item_id")?,
            timestamp: field(self.timestamp, "timestamp")?,
            request: field(self.input, "input")?,
            text: field(self.output, "output")?,
            source: match self.source {
                Some(index) => field(index, "source")?,
                None => default_source.to_owned(),
            },
        };
        checked(item, max_text_bytes)
    }
}

fn import_csv(
    reader: impl BufRead,
    options: &ImportOptions,
    source: &str,
    writer: &mut BatchWriter<'_>,
    on_progress: &mut dyn FnMut(&ImportProgress),
) -> Result<()> {
    let mut csv = csv::ReaderBuilder::new()
        .flexible(true)
        .has_headers(true)
        .from_reader(reader);
    let csv_error = |e: csv::Error| match e.into_kind() {
        csv::ErrorKind::Io(e) => Error::io("<import input>", e),
        other => Error::Import {
            path: "<import input>".into(),
            reason: format!("{other:?}"),
        },
    };
    let header = csv.byte_headers().map_err(csv_error)?.clone();
    let columns = CsvColumns::from_header(&header)?;

    let mut record = csv::ByteRecord::new();
    loop {
        let read = csv.read_byte_record(&mut record);
        let position = csv.position().clone();
        writer.progress.bytes = position.byte();
        match read {
            Ok(false) => return Ok(()),
            Ok(true) => {
                let line = record.position().map_or(position.line(), |p| p.line());
                writer.progress.lines = line;
                match columns.item(&record, header.len(), source, options.max_text_bytes) {
                    Ok(item) => writer.push_line(vec![item], on_progress)?,
                    Err(reason) => writer.bad(line, reason),
                }
            }
            Err(e) if e.is_io_error() => return Err(csv_error(e)),
            Err(e) => {
                let line = e.position().map_or(position.line(), |p| p.line());
                writer.bad(line, format!("unreadable CSV record: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn import(store: &Store, text: &[u8], format: ImportFormat) -> ImportReport {
        let options = ImportOptions {
            format,
            ..ImportOptions::default()
        };
        store.import_reader(text, &options, &mut |_| {}).unwrap()
    }

    #[test]
    fn a_long_line_is_skipped_without_losing_the_next() {
        let mut input: &[u8] = b"0123456789\nabc\r\nlast";
        let mut line = Vec::new();
        let mut seen = Vec::new();
        loop {
            match read_line_limited(&mut input, &mut line, 5).unwrap() {
                (LineRead::End, _) => break,
                (LineRead::TooLong, n) => seen.push(format!("too long ({n})")),
                (LineRead::Line, n) => {
                    seen.push(format!("{} ({n})", String::from_utf8_lossy(&line)))
                }
            }
        }
        assert_eq!(seen, ["too long (11)", "abc\r (5)", "last (4)"]);
    }

    #[test]
    fn jsonl_mixes_user_lines_and_item_lines_and_names_bad_fields() {
        let store = Store::open_in_memory().unwrap();
        let text = concat!(
            r#"{"user_id":"u1","history":[{"id":"a","timestamp":"2024-01-01T00:00:00Z","input":"r","output":"one"},"#,
            r#"{"id":"b","timestamp":"2024-01-02T00:00:00Z","input":"r","output":"two","source":"app"}]}"#,
            "\n\n",
            r#"{"user_id":"u2","id":"x","timestamp":"2024-01-01T00:00:00Z","input":"r","output":"solo"}"#,
            "\n",
            r#"{"user_id":"u3","history":[{"id":"a","timestamp":"2024-01-01T00:00:00Z","input":"r","output":"ok"},"#,
            r#"{"id":"b","timestamp":"soon","input":"r","output":"late"}]}"#,
            "\n",
            r#"["not", "an", "object"]"#,
            "\n",
        );
        let report = import(&store, text.as_bytes(), ImportFormat::Jsonl);
        assert_eq!(
            (report.imported, report.updated, report.unchanged),
            (3, 0, 0)
        );
        let bad: Vec<(u64, &str)> = report
            .bad
            .iter()
            .map(|b| (b.line, b.reason.as_str()))
            .collect();
        assert_eq!(bad.len(), 2);
        assert_eq!(bad[0].0, 4);
        assert!(
            bad[0].1.starts_with("history[1]: `timestamp`"),
            "{}",
            bad[0].1
        );
        assert_eq!(bad[1], (5, "not a JSON object"));

        let sources: Vec<String> = store
            .items("u1")
            .unwrap()
            .into_iter()
            .map(|i| i.source)
            .collect();
        assert_eq!(sources, ["import", "app"]);
        // The bad line is all or nothing: u3's good first item is not stored.
        assert!(store.items("u3").is_err());
    }

    #[test]
    fn csv_reads_columns_by_header_and_reports_records_by_line() {
        let store = Store::open_in_memory().unwrap();
        let mut text = b"output,user_id,item_id,timestamp,input\n\
            \"two\nlines\",u1,a,2024-01-01T00:00:00Z,r\n\
            short,u1\n\
            ok,u1,b,2024-01-02T00:00:00Z,r\n"
            .to_vec();
        text.extend_from_slice(b"bad \xff byte,u1,c,2024-01-03T00:00:00Z,r\n");
        let report = import(&store, &text, ImportFormat::Csv);
        assert_eq!(report.imported, 2);
        let bad: Vec<(u64, String)> = report.bad.into_iter().map(|b| (b.line, b.reason)).collect();
        assert_eq!(
            bad,
            [
                (4, "has 2 fields, the header 5".to_owned()),
                (6, "`output` has invalid UTF-8 at byte 4".to_owned()),
            ]
        );
        assert_eq!(store.item("u1", "a").unwrap().unwrap().text, "two\nlines");

        let missing = store.import_reader(
            &b"user_id,item_id\n"[..],
            &ImportOptions {
                format: ImportFormat::Csv,
                ..ImportOptions::default()
            },
            &mut |_| {},
        );
        assert!(matches!(missing, Err(Error::Import { .. })));
    }

    #[test]
    fn export_imports_back_unchanged() {
        let store = Store::open_in_memory().unwrap();
        let text = r#"{"user_id":"u1","history":[{"id":"b","timestamp":"2024-01-02T00:00:00+01:00","input":"r \"q\"","output":"two\nlines"},{"id":"a","timestamp":"2024-01-01T00:00:00Z","input":"r","output":"one é"}]}"#;
        import(&store, text.as_bytes(), ImportFormat::Jsonl);
        let mut exported = Vec::new();
        assert_eq!(store.export_user("u1", &mut exported).unwrap(), 2);

        let report = import(&store, &exported, ImportFormat::Jsonl);
        assert_eq!(
            (report.imported, report.updated, report.unchanged),
            (0, 0, 2)
        );

        let fresh = Store::open_in_memory().unwrap();
        import(&fresh, &exported, ImportFormat::Jsonl);
        let mut again = Vec::new();
        fresh.export_user("u1", &mut again).unwrap();
        assert_eq!(exported, again);
        assert_eq!(fresh.items("u1").unwrap(), store.items("u1").unwrap());
    }
}
