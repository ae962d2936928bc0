//! Log output for the daemon and the CLI.
//!
//! File names come from local users and from the peer, and node names and
//! reasons from the peer: any of them may hold a newline or a terminal
//! escape. Every log record passes through [`EscapingWriter`], which turns
//! control characters into visible escapes (`\n`, `\x1b`, …), so a record
//! is always exactly one line and a file name can never forge another
//! record or repaint an operator's terminal. Doing it at the writer covers
//! every call site, present and future.
//!
//! No thread waits for its log records to be written: each is queued to one
//! writer thread (`hasync-log`), at most [`LOG_QUEUED_MAX`] waiting, and one
//! that finds the queue full is dropped and counted ([`dropped`]). The
//! daemon's loop carries the heartbeats; a record written from it into a
//! pipe or a journal socket that is not drained (journald behind a busy
//! disk), or into a file on a disk whose dirty pages are being throttled,
//! would silence them, and the peer would take over. The journal gets its
//! native protocol from the same thread ([`JournalLayer`]): every field a
//! journal field of its own (`F_ROLE`, `F_EPOCH`, …), named as
//! `tracing-journald` names them (that crate sends from the logging thread
//! itself).

use std::borrow::Cow;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

/// Log records waiting for the writer thread at most; more are dropped.
pub const LOG_QUEUED_MAX: usize = 16_384;

/// Where the writer thread sends records.
enum Sink {
    Stderr,
    /// The journal's native socket (one datagram per record).
    Journal(std::os::unix::net::UnixDatagram),
}

/// The journal's native socket.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Records dropped because the writer thread fell behind.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Records queued and not yet written.
static PENDING: AtomicU64 = AtomicU64::new(0);

/// The queue to the writer thread, once started.
static QUEUE: OnceLock<crossbeam_channel::Sender<Vec<u8>>> = OnceLock::new();

/// Records dropped so far because the writer thread fell behind (a stalled
/// journal or stderr) or the journal refused them.
pub fn dropped() -> u64 {
    DROPPED.load(Relaxed)
}

/// Starts the writer thread for `sink` (once per process; a later call
/// keeps the first sink).
fn start_writer(sink: Sink) -> io::Result<crossbeam_channel::Sender<Vec<u8>>> {
    if let Some(tx) = QUEUE.get() {
        return Ok(tx.clone());
    }
    let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(LOG_QUEUED_MAX);
    std::thread::Builder::new()
        .name("hasync-log".into())
        .spawn(move || {
            let mut err = io::stderr();
            for rec in rx {
                match &sink {
                    Sink::Stderr => {
                        let _ = err.write_all(&rec);
                    }
                    Sink::Journal(sock) => {
                        // A record the journal refuses (too large, gone)
                        // is lost: counted like one the queue refused.
                        if sock.send_to(&rec, JOURNAL_SOCKET).is_err() {
                            DROPPED.fetch_add(1, Relaxed);
                        }
                    }
                }
                PENDING.fetch_sub(1, Relaxed);
            }
        })?;
    Ok(QUEUE.get_or_init(|| tx).clone())
}

/// Queues `rec` for the writer thread, or drops it (counted) when the queue
/// is full.
fn enqueue(tx: &crossbeam_channel::Sender<Vec<u8>>, rec: Vec<u8>) {
    PENDING.fetch_add(1, Relaxed);
    if tx.try_send(rec).is_err() {
        PENDING.fetch_sub(1, Relaxed);
        DROPPED.fetch_add(1, Relaxed);
    }
}

/// Waits (up to `limit`) until the records queued so far are written: at
/// the end of the process, so that its last records are not lost.
pub fn flush(limit: std::time::Duration) {
    let until = std::time::Instant::now() + limit;
    while PENDING.load(Relaxed) > 0 && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// A `MakeWriter` for tracing's formatters: each record, escaped, goes to
/// the writer thread's queue.
#[derive(Clone)]
struct Queued {
    tx: crossbeam_channel::Sender<Vec<u8>>,
    ansi: bool,
}

impl Write for Queued {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        enqueue(&self.tx, escape_record(buf, self.ansi).into_owned());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Queued {
    type Writer = Queued;
    fn make_writer(&'a self) -> Queued {
        self.clone()
    }
}

/// The journal's native protocol, formatted on the logging thread and sent
/// by the writer thread. Field names as `tracing-journald` writes them:
/// `PRIORITY`, `TARGET`, `CODE_FILE`, `CODE_LINE`, `SYSLOG_IDENTIFIER`,
/// `MESSAGE`, and `F_<NAME>` for the event's own fields.
pub struct JournalLayer {
    tx: crossbeam_channel::Sender<Vec<u8>>,
}

impl JournalLayer {
    /// Connects to the journal (fails when no journal listens) and starts
    /// the writer thread.
    fn new() -> io::Result<JournalLayer> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        // An empty datagram, which the journal discards: is it there?
        sock.send_to(&[], JOURNAL_SOCKET)?;
        Ok(JournalLayer {
            tx: start_writer(Sink::Journal(sock))?,
        })
    }
}

/// Appends field `prefix` + `name` (sanitised as the journal wants it:
/// upper-case letters, digits and `_`, `.` as `_`, no leading `_`) with
/// `value` in the length-encoded form, which takes any bytes.
fn put_field(buf: &mut Vec<u8>, prefix: &str, name: &str, value: &[u8]) {
    buf.extend_from_slice(prefix.as_bytes());
    buf.extend(
        name.bytes()
            .map(|c| if c == b'.' { b'_' } else { c })
            .skip_while(|c| prefix.is_empty() && *c == b'_')
            .filter(|c| *c == b'_' || c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_uppercase()),
    );
    buf.push(b'\n');
    buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

/// The journal's record of one event.
fn journal_record(event: &tracing::Event<'_>) -> Vec<u8> {
    use tracing::Level;
    let meta = event.metadata();
    let mut buf = Vec::with_capacity(256);
    let priority: &[u8] = match *meta.level() {
        Level::ERROR => b"3",
        Level::WARN => b"4",
        Level::INFO => b"5",
        Level::DEBUG => b"6",
        Level::TRACE => b"7",
    };
    put_field(&mut buf, "", "PRIORITY", priority);
    put_field(&mut buf, "", "TARGET", meta.target().as_bytes());
    if let Some(file) = meta.file() {
        put_field(&mut buf, "", "CODE_FILE", file.as_bytes());
    }
    if let Some(line) = meta.line() {
        put_field(&mut buf, "", "CODE_LINE", line.to_string().as_bytes());
    }
    put_field(&mut buf, "", "SYSLOG_IDENTIFIER", b"hasync");
    struct Fields<'a>(&'a mut Vec<u8>);
    impl tracing::field::Visit for Fields<'_> {
        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            match field.name() {
                "message" => put_field(self.0, "", "MESSAGE", value.as_bytes()),
                name => put_field(self.0, "F_", name, value.as_bytes()),
            }
        }
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            self.record_str(field, &format!("{value:?}"));
        }
    }
    event.record(&mut Fields(&mut buf));
    buf
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for JournalLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        enqueue(&self.tx, journal_record(event));
    }
}

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
        LogFormat::Journald => match JournalLayer::new() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .init();
                return;
            }
            Err(e) => Some(e),
        },
        _ => None,
    };
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let tx = match start_writer(Sink::Stderr) {
        Ok(tx) => tx,
        Err(e) => {
            // No thread to write from: each thread writes its own records
            // (and may wait for stderr).
            tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_writer(move || EscapingWriter::new(io::stderr(), ansi))
                .with_ansi(ansi)
                .init();
            tracing::warn!("cannot start the log writer thread ({e}): writing to stderr directly");
            return;
        }
    };
    if format == LogFormat::Json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter())
            .with_writer(Queued { tx, ansi: false })
            .init();
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(Queued { tx, ansi })
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
    fn a_journal_record_carries_every_field_length_encoded() {
        use tracing_subscriber::prelude::*;
        struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                *self.0.lock().unwrap() = journal_record(event);
            }
        }
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sub = tracing_subscriber::registry().with(Capture(got.clone()));
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(role = "primary", epoch = 7u64, "line one\nline two");
        });
        let rec = got.lock().unwrap().clone();
        // Decode NAME\n<u64 len><value>\n … back.
        let mut fields = std::collections::BTreeMap::new();
        let mut rest = &rec[..];
        while !rest.is_empty() {
            let nl = rest.iter().position(|b| *b == b'\n').unwrap();
            let name = String::from_utf8(rest[..nl].to_vec()).unwrap();
            let len = u64::from_le_bytes(rest[nl + 1..nl + 9].try_into().unwrap()) as usize;
            let value = String::from_utf8(rest[nl + 9..nl + 9 + len].to_vec()).unwrap();
            assert_eq!(rest[nl + 9 + len], b'\n');
            rest = &rest[nl + 10 + len..];
            fields.insert(name, value);
        }
        assert_eq!(fields["PRIORITY"], "4");
        assert_eq!(fields["MESSAGE"], "line one\nline two");
        assert_eq!(fields["F_ROLE"], "primary");
        assert_eq!(fields["F_EPOCH"], "7");
        assert_eq!(fields["SYSLOG_IDENTIFIER"], "hasync");
        assert!(fields["TARGET"].starts_with("hasync"), "{fields:?}");
        let mut odd = Vec::new();
        put_field(&mut odd, "", "_a.b-c", b"v");
        assert!(
            odd.starts_with(b"A_BC\n"),
            "{:?}",
            String::from_utf8_lossy(&odd)
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
