//! Printing: aligned tables for people, JSON and YAML for scripts.

use serde::Serialize;

use crate::Format;

/// Prints rows as `format`: a table from (headers, cells), or the serialized value.
pub fn print<T: Serialize>(
    format: Format,
    value: &T,
    headers: &[&str],
    rows: Vec<Vec<String>>,
) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Yaml => print!("{}", serde_saphyr::to_string(value)?),
        Format::Table => print!("{}", table_with(headers, &rows, color())),
    }
    Ok(())
}

/// Whether to color tables: stdout is a terminal and `NO_COLOR` is not set.
pub fn color() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// The ANSI color of a state word (green: good, yellow: degraded, red: broken).
fn paint(cell: &str) -> Option<&'static str> {
    match cell {
        "SYNCED" | "ready" | "PROMOTED" => Some("32"),
        "STALE" | "CONNECTING" | "NOT_SENT" | "serving" | "terminating" | "HOLDING" => Some("33"),
        "NACKED" | "EXPIRED" | "not-ready" | "ejected" | "ROLLED_BACK" => Some("31"),
        _ if cell.ends_with("(stale)") => Some("33"),
        _ => None,
    }
}

/// Renders an aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    table_with(headers, rows, false)
}

/// Renders an aligned table, coloring state words when `color`.
pub fn table_with(headers: &[&str], rows: &[Vec<String>], color: bool) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>, body: bool| -> String {
        let mut s = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let padded = format!("{c:<width$}", width = widths.get(i).copied().unwrap_or(0));
                match (body && color).then(|| paint(c)).flatten() {
                    Some(code) => format!("\x1b[{code}m{c}\x1b[0m{}", &padded[c.len()..]),
                    None => padded,
                }
            })
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(headers.to_vec(), false);
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect(), true));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn color_only_when_asked_and_alignment_survives_it() {
        let rows = vec![
            vec!["a".to_string(), "SYNCED".to_string(), "x".to_string()],
            vec!["bb".to_string(), "NACKED".to_string(), "y".to_string()],
        ];
        let plain = table(&["P", "STATE", "Z"], &rows);
        assert!(!plain.contains('\x1b'), "{plain}");
        let colored = table_with(&["P", "STATE", "Z"], &rows, true);
        assert!(colored.contains("\x1b[32mSYNCED\x1b[0m"), "{colored}");
        assert!(colored.contains("\x1b[31mNACKED\x1b[0m"), "{colored}");
        let strip = |s: &str| {
            s.replace("\x1b[32m", "")
                .replace("\x1b[31m", "")
                .replace("\x1b[0m", "")
        };
        assert_eq!(strip(&colored), plain, "coloring changes no column");
    }
}
