//! What a CLI command prints on stdout: the server's JSON as it came (`--json`, one document) or a human
//! view (aligned tables, `key: value` lines) made from it. Notes for the operator go to stderr.

use std::io::Write;

use serde_json::Value;

use crate::cli::client::Answer;

/// Where and how a command prints.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// The answer: its raw body with `--json`, else `human(json)`.
    pub fn answer(&self, answer: &Answer, human: impl FnOnce(&Value) -> String) {
        if answer.replayed {
            eprintln!("note: the server replayed the stored outcome of this idempotency key");
        }
        if self.json {
            let mut raw = answer.raw.clone();
            if !raw.ends_with(b"\n") {
                raw.push(b'\n');
            }
            stdout(&raw);
        } else {
            stdout(human(&answer.json).as_bytes());
        }
    }

    /// A document the CLI put together (e.g. `status`'s): pretty JSON with `--json`, else `human`.
    pub fn document(&self, json: &Value, human: impl FnOnce(&Value) -> String) {
        if self.json {
            stdout(format!("{json}\n").as_bytes());
        } else {
            stdout(human(json).as_bytes());
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) is not worth a panic.
fn stdout(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes);
    let _ = out.flush();
}

/// A field of a JSON object as table text: strings bare, `null`/missing as `-`.
pub fn text(value: &Value, pointer: &str) -> String {
    match value.pointer(pointer) {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Columns aligned with two spaces between them; the last column is not padded.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<const N: usize>(header: [&str; N]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    /// One more column heading (for columns shown only sometimes).
    pub fn column(mut self, heading: &str) -> Table {
        self.rows[0].push(heading.to_owned());
        self
    }

    pub fn row(&mut self, cells: Vec<String>) -> &mut Table {
        self.rows.push(cells);
        self
    }

    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                let cell = |row: &Vec<String>| row.get(c).map_or(0, |s| s.chars().count());
                self.rows.iter().map(cell).max().unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let last = row.len().saturating_sub(1);
            for (c, cell) in row.iter().enumerate() {
                out.push_str(cell);
                if c < last {
                    let pad = widths[c] - cell.chars().count() + 2;
                    out.extend(std::iter::repeat_n(' ', pad));
                }
            }
            // An empty last cell leaves the padding of the one before it.
            out.truncate(out.trim_end_matches(' ').len());
            out.push('\n');
        }
        out
    }
}

/// `key: value` lines, the keys padded to one width.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(key, value)| format!("{key:width$}  {value}\n", key = format!("{key}:")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_on_the_widest_cell() {
        let mut table = Table::new(["ID", "NAME"]);
        table.row(vec!["gems-100".into(), "100 Gems".into()]);
        table.row(vec!["x".into(), "Dragon".into()]);
        table.row(vec!["y".into(), String::new()]);
        assert_eq!(
            table.render(),
            "ID        NAME\ngems-100  100 Gems\nx         Dragon\ny\n"
        );
    }

    #[test]
    fn fields_pad_keys_to_the_longest() {
        let text = fields(&[("user", "u1".into()), ("balance", "2.00".into())]);
        assert_eq!(text, "user:     u1\nbalance:  2.00\n");
    }

    #[test]
    fn text_shows_missing_and_null_as_a_dash() {
        let v = serde_json::json!({"a": null, "b": "x", "c": 3});
        assert_eq!(
            [
                text(&v, "/a"),
                text(&v, "/b"),
                text(&v, "/c"),
                text(&v, "/d")
            ],
            ["-", "x", "3", "-"]
        );
    }
}
