//! Log output for the daemon and the CLI.
//!
//! File names come from local users and from the peer, and node names and
//! reasons from the peer: any of them may hold a newline or a terminal
//! escape. Every log record passes through [`EscapingWriter`], which turns
//! control characters into visible escapes (`\n`, `\x1b`, …), so a record
//! is always exactly one line and a file name can never forge another
//! record or repaint an operator's terminal. Doing it at the writer covers
//! every call site, present and future.

use std::borrow::Cow;
use std::io::{self, Write};

/// `s` with control characters (and the Unicode line and paragraph
/// separators) shown as escapes; borrowed when there is nothing to escape.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        push_char(&mut out, c);
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

fn push_char(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if needs_escape(c) => {
            let n = c as u32;
            if n <= 0xff {
                out.push_str(&format!("\\x{n:02x}"));
            } else {
                out.push_str(&format!("\\u{{{n:04x}}}"));
            }
        }
        c => out.push(c),
    }
}

/// One formatted record made safe: every control character but the final
/// newline escaped; with `ansi`, the escape character is kept (the
/// formatter's colours use it; a terminal is a human's, not a log file).
pub fn escape_record(record: &[u8], ansi: bool) -> Cow<'_, [u8]> {
    let body = record.strip_suffix(b"\n").unwrap_or(record);
    let text = String::from_utf8_lossy(body);
    let unsafe_char = |c: char| needs_escape(c) && !(ansi && c == '\u{1b}');
    if !text.chars().any(unsafe_char) && matches!(text, Cow::Borrowed(_)) {
        return Cow::Borrowed(record);
    }
    let mut out = String::with_capacity(record.len() + 16);
    for c in text.chars() {
        if unsafe_char(c) {
            push_char(&mut out, c);
        } else {
            out.push(c);
        }
    }
    if body.len() != record.len() {
        out.push('\n');
    }
    Cow::Owned(out.into_bytes())
}

/// Writes each record (tracing-subscriber hands over one whole record per
/// `write_all`) escaped to the inner writer.
pub struct EscapingWriter<W> {
    inner: W,
    ansi: bool,
}

impl<W: Write> EscapingWriter<W> {
    pub fn new(inner: W, ansi: bool) -> Self {
        EscapingWriter { inner, ansi }
    }
}

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write_all(&escape_record(buf, self.ansi))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Installs the global subscriber: `RUST_LOG` filtering (default `info`),
/// records on stderr, escaped; colours only on a terminal without
/// `NO_COLOR`.
/// `--log-format`: how the daemon's records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// journald when systemd started the daemon (`JOURNAL_STREAM` set),
    /// human lines on stderr otherwise.
    #[default]
    Auto,
    /// Human lines on stderr (coloured on a terminal).
    Text,
    /// One JSON object per line on stderr (`timestamp`, `level`, `target`,
    /// `fields` with `message` and the structured fields), for shippers.
    Json,
    /// The native journal protocol: every field (role, epoch, peer, store,
    /// path, alarm) a journal field of its own.
    Journald,
}

pub fn init() {
    init_with(LogFormat::Text);
}

pub fn init_with(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let format = match format {
        LogFormat::Auto if std::env::var_os("JOURNAL_STREAM").is_some() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    let journald_failed = match format {
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter())
                    .with(layer.with_syslog_identifier("hasync".into()))
                    .init();
                return;
            }
            Err(e) => Some(e),
        },
        _ => None,
    };
    if format == LogFormat::Json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter())
            .with_writer(move || EscapingWriter::new(io::stderr(), false))
            .init();
        return;
    }
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(move || EscapingWriter::new(io::stderr(), ansi))
        .with_ansi(ansi)
        .init();
    if let Some(e) = journald_failed {
        tracing::warn!("cannot reach the journal ({e}): logging to stderr instead");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_name_cannot_forge_a_log_line() {
        let forged = "INFO refused path \"x\n2026-12-01T00:00:00Z INFO hasync::daemon: FORGED role change\"\n";
        let out = escape_record(forged.as_bytes(), false);
        let text = std::str::from_utf8(&out).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("x\\n2026-12-01T00:00:00Z"), "{text}");
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn terminal_escapes_and_separators_are_shown_not_sent() {
        let rec = "a\u{1b}[2Jb\rc\u{2028}d\u{7f}\n";
        let out = escape_record(rec.as_bytes(), false);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "a\\x1b[2Jb\\rc\\u{2028}d\\x7f\n"
        );
        // With colours on, ESC stays (the formatter's own), newlines do not.
        let out = escape_record("\u{1b}[33mWARN\u{1b}[0m a\nb\n".as_bytes(), true);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "\u{1b}[33mWARN\u{1b}[0m a\\nb\n"
        );
    }

    #[test]
    fn clean_records_are_passed_through_untouched() {
        let rec = b"2026-12-01T00:00:00Z INFO hasync: fine\n";
        assert!(matches!(escape_record(rec, false), Cow::Borrowed(_)));
        assert!(matches!(printable("fine"), Cow::Borrowed(_)));
        assert_eq!(printable("a\nb"), "a\\nb");
    }
}
