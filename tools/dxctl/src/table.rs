//! Plain-text tables for people: left-aligned columns separated by two spaces.

use std::fmt;

/// A table with a header row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column titles.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (as many cells as columns).
    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.header.len(), "one cell per column");
        self.rows.push(row);
    }

    /// The rows so far.
    pub fn rows(&self) -> &[Vec<String>] {
        &self.rows
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<width$}  "));
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// How long ago `ts_ms` was at `now_ms`, in the largest whole unit (`42s ago`, `3m ago`,
/// `5h ago`, `2d ago`); a time in the future (clock skew) reads `now`.
pub fn age(now_ms: u64, ts_ms: u64) -> String {
    let s = now_ms.saturating_sub(ts_ms) / 1000;
    match s {
        0 => "now".into(),
        1..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// Milliseconds, or `-` when unknown.
pub fn ms(value: Option<u64>) -> String {
    value.map_or("-".into(), |v| format!("{v} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_the_widest_cell() {
        let mut table = Table::new(&["DEVICE", "STATE"]);
        table.push(vec!["k1".into(), "online".into()]);
        table.push(vec!["kiosk-long".into(), "offline (shutdown)".into()]);
        assert_eq!(
            table.to_string(),
            "DEVICE      STATE\nk1          online\nkiosk-long  offline (shutdown)\n"
        );
    }

    #[test]
    fn ages_use_the_largest_unit() {
        assert_eq!(age(10_000, 10_000), "now");
        assert_eq!(age(10_000, 20_000), "now");
        assert_eq!(age(52_000, 10_000), "42s ago");
        assert_eq!(age(200_000, 10_000), "3m ago");
        assert_eq!(age(5 * 3_600_000 + 1, 0), "5h ago");
        assert_eq!(age(2 * 86_400_000, 0), "2d ago");
    }
}
