//! Log lines, formatted off the request path.
//!
//! Where an event happens, its fields are only captured: numbers as they are, strings
//! and `Display`/`Debug` values copied into a small record, the enclosing spans by
//! reference (their fields were captured once, when the span was made). One thread
//! formats what is queued (text or JSON) and writes it to stderr in one batch; a request
//! wakes it only when it sleeps (see [`Writer`]), so under load no request pays for a
//! wake, and after a quiet spell a line is written at once. A queue that is full (a stderr nobody reads)
//! drops lines and counts them in `berth_log_lines_dropped_total`; it never stalls a
//! request.
//!
//! The JSON shape is tracing-subscriber's with flattened events: `timestamp`, `level`,
//! `message`, the event's fields, `target`, `span` (the innermost) and `spans`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// How many lines may wait for the writer thread (a few MiB at most).
const QUEUE: usize = 16 * 1024;

/// Lines dropped because the queue was full.
static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// The dropped-lines counter, to register with the metrics.
pub fn dropped_lines() -> Counter {
    DROPPED.clone()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// A field's value as captured.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Str(Box<str>),
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
}

type Fields = Vec<(&'static str, Value)>;

#[derive(Debug)]
struct SpanData {
    name: &'static str,
    fields: Fields,
}

/// One event, captured.
struct Line {
    time: SystemTime,
    level: Level,
    target: &'static str,
    message: Option<Box<str>>,
    fields: Fields,
    /// Outermost first.
    spans: Vec<Arc<SpanData>>,
}

/// What the writer thread is asked to do.
enum Msg {
    Line(Line),
    /// Write everything queued before this, flush, and say so.
    Flush(mpsc::SyncSender<()>),
}

/// How long exit waits for queued lines to be written.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

/// Dropping it writes what is queued (waiting up to [`FLUSH_AT_EXIT`]); the thread itself
/// lives as long as the process (the global subscriber keeps its queue open).
pub struct Guard {
    tx: SyncSender<Msg>,
    writer: Arc<Writer>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let (ack, done) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            self.writer.unpark();
            let _ = done.recv_timeout(FLUSH_AT_EXIT);
        }
    }
}

/// The writer thread, as the senders see it: woken only when it has nothing to do. A
/// busy writer picks lines up by itself, so under load a request never pays for a wake
/// (a futex call), while a line logged after a quiet spell is written at once.
#[derive(Default)]
struct Writer {
    idle: AtomicBool,
    thread: OnceLock<std::thread::Thread>,
}

impl Writer {
    /// After a line was queued: wakes the writer if it sleeps (once per quiet spell).
    fn queued(&self) {
        if self.idle.swap(false, Ordering::AcqRel) {
            self.unpark();
        }
    }

    fn unpark(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` (default `info`), lines in `format` on
/// stderr.
pub fn init(format: Format) -> Guard {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (layer, guard) = layer(format, std::io::stderr());
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
    guard
}

/// The capturing layer and the thread that writes its lines to `out`.
fn layer(format: Format, out: impl std::io::Write + Send + 'static) -> (OffPath, Guard) {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let writer = Arc::new(Writer::default());
    // Without its thread (it could not be started), lines are dropped and counted.
    let w = writer.clone();
    let _ = std::thread::Builder::new()
        .name("berth-log".into())
        .spawn(move || write_lines(rx, format, out, &w));
    (
        OffPath {
            tx: tx.clone(),
            writer: writer.clone(),
        },
        Guard { tx, writer },
    )
}

/// How long the writer lingers after a batch before it calls itself idle: lines logged
/// meanwhile join the next batch without waking it. Also the most a line waits under load.
const LINGER: Duration = Duration::from_millis(1);

/// The writer thread: formats what is queued into one buffer, writes it out, lingers,
/// and sleeps once the queue stays empty, until the next line wakes it.
fn write_lines(rx: Receiver<Msg>, format: Format, out: impl std::io::Write, writer: &Writer) {
    let _ = writer.thread.set(std::thread::current());
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut text = String::with_capacity(512);
    let mut lingered = false;
    loop {
        let mut next = match rx.try_recv() {
            Ok(msg) => Some(msg),
            Err(mpsc::TryRecvError::Disconnected) => return,
            Err(mpsc::TryRecvError::Empty) if !lingered => {
                std::thread::park_timeout(LINGER);
                lingered = true;
                continue;
            }
            Err(mpsc::TryRecvError::Empty) => {
                // Idle from here: the next line wakes us. Looked at once more after saying
                // so, as a line queued just before would not have woken us.
                writer.idle.store(true, Ordering::Release);
                match rx.try_recv() {
                    Ok(msg) => Some(msg),
                    Err(mpsc::TryRecvError::Disconnected) => return,
                    Err(mpsc::TryRecvError::Empty) => {
                        // Timed, to notice a closed queue (a test's subscriber dropped).
                        std::thread::park_timeout(Duration::from_secs(1));
                        continue;
                    }
                }
            }
        };
        writer.idle.store(false, Ordering::Release);
        lingered = false;
        while let Some(msg) = next {
            match msg {
                Msg::Line(line) => {
                    text.clear();
                    match format {
                        Format::Json => json(&line, &mut text),
                        Format::Text => plain(&line, &mut text),
                    }
                    text.push('\n');
                    // stderr failing leaves nowhere to say so.
                    let _ = out.write_all(text.as_bytes());
                }
                Msg::Flush(ack) => {
                    let _ = out.flush();
                    let _ = ack.try_send(());
                }
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
}

/// The layer that captures events and hands them to the writer thread.
pub struct OffPath {
    tx: SyncSender<Msg>,
    writer: Arc<Writer>,
}

impl<S> Layer<S> for OffPath
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut capture = Capture::default();
        attrs.record(&mut capture);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Arc::new(SpanData {
                name: attrs.metadata().name(),
                fields: capture.fields,
            }));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        let Some(data) = ext.get_mut::<Arc<SpanData>>() else {
            return;
        };
        let mut capture = Capture {
            fields: data.fields.clone(),
            message: None,
        };
        values.record(&mut capture);
        *data = Arc::new(SpanData {
            name: data.name,
            fields: capture.fields,
        });
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut capture = Capture::default();
        event.record(&mut capture);
        let spans = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .from_root()
                    .filter_map(|s| s.extensions().get::<Arc<SpanData>>().cloned())
                    .collect()
            })
            .unwrap_or_default();
        let meta = event.metadata();
        let line = Line {
            time: SystemTime::now(),
            level: *meta.level(),
            target: meta.target(),
            message: capture.message,
            fields: capture.fields,
            spans,
        };
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => self.writer.queued(),
            Err(TrySendError::Full(_)) => {
                DROPPED.inc();
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

#[derive(Default)]
struct Capture {
    fields: Fields,
    message: Option<Box<str>>,
}

impl Capture {
    fn put(&mut self, field: &Field, value: Value) {
        match (field.name(), value) {
            ("message", Value::Str(s)) => self.message = Some(s),
            (name, value) => self.fields.push((name, value)),
        }
    }
}

impl Visit for Capture {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::F64(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::I64(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::U64(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::Str(value.into()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        self.put(field, Value::Str(s.into_boxed_str()));
    }
}

/// `{"timestamp":..,"level":..,"message":..,<fields>,"target":..,"span":{..},"spans":[..]}`
fn json(line: &Line, out: &mut String) {
    out.push_str("{\"timestamp\":\"");
    let _ = write!(out, "{}", humantime::format_rfc3339_micros(line.time));
    let _ = write!(out, "\",\"level\":\"{}\"", line.level);
    if let Some(m) = &line.message {
        out.push_str(",\"message\":");
        json_str(m, out);
    }
    for (name, value) in &line.fields {
        out.push(',');
        json_member(name, value, out);
    }
    out.push_str(",\"target\":");
    json_str(line.target, out);
    if let Some(inner) = line.spans.last() {
        out.push_str(",\"span\":");
        json_span(inner, out);
        out.push_str(",\"spans\":[");
        for (i, s) in line.spans.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            json_span(s, out);
        }
        out.push(']');
    }
    out.push('}');
}

fn json_span(span: &SpanData, out: &mut String) {
    out.push('{');
    for (name, value) in &span.fields {
        json_member(name, value, out);
        out.push(',');
    }
    out.push_str("\"name\":");
    json_str(span.name, out);
    out.push('}');
}

/// `"name":value`.
fn json_member(name: &str, value: &Value, out: &mut String) {
    json_str(name, out);
    out.push(':');
    match value {
        Value::Str(s) => json_str(s, out),
        Value::I64(n) => {
            let _ = write!(out, "{n}");
        }
        Value::U64(n) => {
            let _ = write!(out, "{n}");
        }
        // JSON has no NaN or infinity.
        Value::F64(f) if f.is_finite() => {
            let _ = write!(out, "{f}");
        }
        Value::F64(_) => out.push_str("null"),
        Value::Bool(b) => {
            let _ = write!(out, "{b}");
        }
    }
}

/// A JSON string literal, escaped; runs without escapes are copied whole.
fn json_str(s: &str, out: &mut String) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        // `b` is ASCII, so `i` is a char boundary.
        out.push_str(&s[start..i]);
        if escaped.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escaped);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// `<timestamp> <LEVEL> span{k=v}:span{..}: target: message k=v ...`
fn plain(line: &Line, out: &mut String) {
    let _ = write!(
        out,
        "{} {:>5} ",
        humantime::format_rfc3339_micros(line.time),
        line.level
    );
    for span in &line.spans {
        out.push_str(span.name);
        if !span.fields.is_empty() {
            out.push('{');
            for (i, (name, value)) in span.fields.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                plain_field(name, value, out);
            }
            out.push('}');
        }
        out.push_str(": ");
    }
    out.push_str(line.target);
    out.push_str(": ");
    if let Some(m) = &line.message {
        out.push_str(m);
    }
    for (name, value) in &line.fields {
        out.push(' ');
        plain_field(name, value, out);
    }
}

fn plain_field(name: &str, value: &Value, out: &mut String) {
    let _ = match value {
        Value::Str(s) => write!(out, "{name}={s}"),
        Value::I64(n) => write!(out, "{name}={n}"),
        Value::U64(n) => write!(out, "{name}={n}"),
        Value::F64(f) => write!(out, "{name}={f}"),
        Value::Bool(b) => write!(out, "{name}={b}"),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tracing_subscriber::layer::SubscriberExt;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Logs a request-like line inside a span through the real layer and writer thread.
    fn emit(format: Format) -> String {
        let sink = Sink::default();
        let (layer, guard) = layer(format, sink.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("req", id = %"00ab");
            let _in = span.enter();
            tracing::info!(
                method = %"GET",
                repository = "library/\"odd\"\nname",
                status = 200u16,
                bytes = 406u64,
                delta = -3i64,
                duration_ms = 0.25,
                stale = false,
                "request"
            );
        });
        drop(guard); // waits until everything queued is written
        let out = sink.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_lines_keep_the_flattened_shape() {
        let text = emit(Format::Json);
        assert_eq!(text.lines().count(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["message"], "request");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["repository"], "library/\"odd\"\nname");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes"], 406);
        assert_eq!(v["delta"], -3);
        assert_eq!(v["duration_ms"], 0.25);
        assert_eq!(v["stale"], false);
        assert_eq!(v["target"], module_path!());
        assert_eq!(v["span"]["id"], "00ab");
        assert_eq!(v["span"]["name"], "req");
        assert_eq!(v["spans"][0]["id"], "00ab");
        let ts = v["timestamp"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
    }

    #[test]
    fn text_lines_read_like_tracing_subscribers() {
        let text = emit(Format::Text);
        let line = text.trim_end();
        assert!(line.contains(" INFO req{id=00ab}: "), "{line}");
        assert!(line.contains(": request method=GET "), "{line}");
        assert!(line.ends_with("stale=false"), "{line}");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (tx, rx) = mpsc::sync_channel(1);
        let layer = OffPath {
            tx,
            writer: Arc::default(),
        };
        let subscriber = tracing_subscriber::registry().with(layer);
        let before = DROPPED.get();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..3 {
                tracing::info!(i, "line");
            }
        });
        // Nobody read: one line queued, two dropped (other tests may drop too).
        assert_eq!(rx.try_iter().count(), 1);
        assert!(DROPPED.get() >= before + 2);
    }

    #[test]
    fn the_guard_flushes_while_the_layer_lives_on() {
        // As in `main`: the global subscriber (and its queue) outlives the guard.
        let sink = Sink::default();
        let (layer, guard) = layer(Format::Text, sink.clone());
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
        tracing::dispatcher::with_default(&dispatch, || tracing::info!("last words"));
        let started = std::time::Instant::now();
        drop(guard);
        assert!(
            started.elapsed() < FLUSH_AT_EXIT,
            "exit waited for the queue to close"
        );
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(out.contains("last words"), "{out}");
        drop(dispatch);
    }

    #[test]
    fn json_strings_escape_control_characters() {
        let mut out = String::new();
        json_str("a\u{1}b\\c\td", &mut out);
        assert_eq!(out, "\"a\\u0001b\\\\c\\td\"");
        let back: String = serde_json::from_str(&out).unwrap();
        assert_eq!(back, "a\u{1}b\\c\td");
    }
}
