//! Structured logs: `RUST_LOG` picks the level (default `info`), `--log-format`
//! picks human text or one JSON object per line.
//!
//! Logs carry what callers and upstreams sent (names, error messages), so
//! every field of the text format goes through [`EscapingFields`]: a control
//! character (a newline that would forge a line, an escape sequence that
//! would repaint a terminal) is written escaped. The JSON format escapes
//! them by construction.

use std::{fmt, io::IsTerminal};

use tracing_subscriber::{
    EnvFilter,
    field::RecordFields,
    fmt::{
        FormatFields,
        format::{DefaultFields, Writer},
    },
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into files or collectors.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.fmt_fields(EscapingFields::default()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// [`DefaultFields`], with control characters escaped.
#[derive(Debug, Default)]
pub struct EscapingFields(DefaultFields);

impl<'writer> FormatFields<'writer> for EscapingFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut escaped = Escape(writer);
        self.0.format_fields(Writer::new(&mut escaped), fields)
    }
}

/// Writes through, escaping control characters.
struct Escape<W>(W);

impl<W: fmt::Write> fmt::Write for Escape<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(char::is_control) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or_default();
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write;

    use super::*;

    #[test]
    fn control_characters_are_written_escaped() {
        let mut out = String::new();
        Escape(&mut out)
            .write_str("boom\nFORGED\r\tx\u{1b}[31mred\u{7f}ok é")
            .unwrap();
        assert_eq!(out, "boom\\nFORGED\\r\\tx\\u{1b}[31mred\\u{7f}ok é");
    }
}
