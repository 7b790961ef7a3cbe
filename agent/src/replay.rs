//! Replay: the configured rules and summaries over a recording, in event time, as fast as
//! the machine allows — `edgewise replay`.
//!
//! Replay is the technician's laboratory: "what would these rules have said about last
//! week's data?", "what changes if I raise this threshold?" It must answer exactly what the
//! agent would have answered live, so it does not imitate the processor, it *is* the
//! processor: a [`Processor`] built from the same configuration, fed the same
//! [`Entry`] values through [`Processor::apply`] that the journal feeds it in `run`.
//!
//! # How a recording becomes journal entries
//!
//! ```text
//! recording line ──▶ Reading ──▶ [Tick k·T, Tick (k+1)·T, …] ──▶ Event { received_ms = ts_ms }
//!                                 (each multiple of T that event time passed)
//! end of file ──▶ Ticks up to clock + window + allowed_lateness + 1 ms (open windows close)
//! ```
//!
//! - **Event time drives the clock.** Every event gets `received_ms = ts_ms`: the processor's
//!   clock (the largest receive time and tick seen) follows the recording, so windows close
//!   and lateness is judged as on a gateway that received each reading when it was taken.
//! - **Ticks as the journal writer makes them.** Live, the writer journals a tick every
//!   `journal.tick_interval` (T) of wall time; in replay, a tick is inserted before an event
//!   each time event time crosses a multiple of T. Timer rules (missing data) therefore fire
//!   in a gap of the recording at the tick that live operation would have given them. A gap
//!   of more than [`MAX_GAP_TICKS`] ticks (a broken timestamp far in the future) gets that
//!   many ticks and then one at the end of the gap; the rest are counted as skipped.
//! - **File order is journal order.** Readings are not sorted: an out-of-order reading is
//!   late or not by the processor's rules, exactly as it would be live. The clock never moves
//!   back (an older reading does not un-tick anything).
//! - **Deterministic.** [`Replay`] reads no clock; the same recording and configuration give
//!   the same records, seqs included. Only the driver ([`run`]) reads the wall clock, for the
//!   progress line and the events-per-second figure.
//!
//! # Comparing two configurations (`--against`)
//!
//! Both configurations replay the same readings in one pass (two [`Replay`]s). Their alert
//! episodes (raise → clear, per rule and series) are matched by [`compare`]: an episode of
//! one run pairs with the first not-yet-paired episode of the other run with the same rule
//! and series whose time span overlaps it. A pair whose raise or clear time differs has
//! *moved* (with the shift of the raise); an unpaired episode *disappears* (only in the base
//! run) or *appears* (only in the other).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sensors::record::{Alert, AlertState, RecordBody, Summary};
use serde::Serialize;

use crate::config::Config;
use crate::event::{Entry, Event};
use crate::metrics::{self, Metrics};
use crate::processor::{Output, Processor, ProcessorError};
use crate::recording::{self, Line, Reading, RecordingError, format_ms};
use crate::rules::ScoreSample;

/// Most ticks inserted into one gap between two readings. 10^6 ticks of the default 1 s
/// cover 11 days — any real outage — and cost well under a second; a timestamp decades off
/// must not cost billions of ticks.
pub const MAX_GAP_TICKS: u64 = 1_000_000;

/// Bad lines quoted on stderr; the rest are only counted (a wrong file would otherwise
/// print itself line by line).
pub const SHOWN_BAD_LINES: u64 = 5;

/// Rows the table waits for before it fixes its column widths: enough to size the columns
/// for the rules and series of a typical recording, few enough to print the first rows at
/// once. Later, wider cells widen their column from there on.
const TABLE_SETTLE_ROWS: usize = 200;

/// Shortest time between two redraws of the progress line: 5 per second reads as live
/// without spending time on the terminal.
const PROGRESS_REDRAW: Duration = Duration::from_millis(200);

/// Lines read between two looks at the clock for the progress line (a clock read per line
/// would cost more than some lines).
const PROGRESS_CHECK_LINES: u64 = 1024;

/// Errors of a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The configuration's rules or summaries are invalid.
    #[error("{config}: {source}")]
    Processor {
        /// The configuration file.
        config: String,
        /// The processor's report.
        #[source]
        source: ProcessorError,
    },
    /// The recording cannot be read.
    #[error(transparent)]
    Recording(#[from] RecordingError),
    /// The scores file cannot be created or written.
    #[error("cannot {action} the scores file {}: {source}", path.display())]
    Scores {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS's report.
        #[source]
        source: io::Error,
    },
    /// Standard output or error failed.
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

impl ReplayError {
    /// Whether the user can fix this by changing the command line, the configuration or the
    /// input file (exit status 2), rather than a failure while working (exit status 1).
    pub fn is_usage(&self) -> bool {
        match self {
            ReplayError::Processor { .. } => true,
            ReplayError::Recording(e) => e.is_usage(),
            ReplayError::Scores { action, .. } => *action == "create",
            ReplayError::Output(_) => false,
        }
    }

    /// Whether the output was closed by its reader (`edgewise replay … | head`): not a
    /// failure worth a message.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, ReplayError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// What a replay counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Events applied.
    pub events: u64,
    /// Ticks applied.
    pub ticks: u64,
    /// Ticks left out of gaps longer than [`MAX_GAP_TICKS`].
    pub skipped_ticks: u64,
    /// Alerts raised.
    pub alerts_raised: u64,
    /// Alerts cleared.
    pub alerts_cleared: u64,
    /// Summaries emitted.
    pub summaries: u64,
    /// Events older than their window's allowed lateness.
    pub late_events: u64,
    /// Events stamped too far in the future.
    pub future_events: u64,
}

/// The processor over a stream of readings; see the module docs.
#[derive(Debug)]
pub struct Replay {
    processor: Processor,
    metrics: Metrics,
    /// Journal seq of the last applied entry.
    seq: u64,
    tick_ms: i64,
    /// The next multiple of `tick_ms` to apply; `None` before the first reading.
    next_tick: Option<i64>,
    /// Largest event time seen.
    clock: Option<i64>,
    /// How far past the clock [`Replay::finish`] ticks: window + allowed lateness + 1 ms.
    drain_ms: i64,
    ticks: u64,
    skipped_ticks: u64,
}

impl Replay {
    /// A replay with fresh processor state for `config`.
    pub fn new(config: &Config) -> Result<Replay, ProcessorError> {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Ok(Replay {
            processor: Processor::new(config)?,
            metrics: Metrics::default(),
            seq: 0,
            // Validation keeps the interval at 10 ms or more; 1 ms guards the arithmetic.
            tick_ms: ms(config.journal.tick_interval).max(1),
            next_tick: None,
            clock: None,
            drain_ms: ms(config.summary.window)
                .saturating_add(ms(config.summary.allowed_lateness))
                .saturating_add(1),
            ticks: 0,
            skipped_ticks: 0,
        })
    }

    /// Applies one reading, after the ticks its event time passed; records go to `out`.
    pub fn push(&mut self, ts_ms: i64, series: &str, value: f64, out: &mut Vec<Output>) {
        match self.next_tick {
            Some(_) => self.tick_through(ts_ms, out),
            None => self.next_tick = Some(next_multiple(ts_ms, self.tick_ms)),
        }
        let event =
            Event { series: series.to_string(), ts_ms, value, received_ms: ts_ms, source: 0 };
        self.apply(&Entry::Event(event), out);
        self.clock = Some(self.clock.map_or(ts_ms, |c| c.max(ts_ms)));
    }

    /// Ends the recording: ticks up to the clock + window + allowed lateness + 1 ms, so that
    /// every open window closes and due timers fire. Idempotent.
    pub fn finish(&mut self, out: &mut Vec<Output>) {
        let Some(clock) = self.clock else { return };
        let end = clock.saturating_add(self.drain_ms);
        self.tick_through(end, out);
        if self.processor_clock() < end {
            self.apply(&Entry::Tick { now_ms: end }, out);
            self.ticks += 1;
        }
    }

    /// Starts (or stops) recording the anomaly rules' scores (see [`Replay::take_scores`]).
    pub fn record_scores(&mut self, on: bool) {
        self.processor.record_scores(on);
    }

    /// The scores recorded since the last call, in processing order.
    pub fn take_scores(&mut self) -> Vec<ScoreSample> {
        self.processor.take_scores()
    }

    /// What has been counted so far.
    pub fn counts(&self) -> Counts {
        let m = &self.metrics;
        Counts {
            events: metrics::get(&m.events_processed),
            ticks: self.ticks,
            skipped_ticks: self.skipped_ticks,
            alerts_raised: metrics::get(&m.alerts_raised),
            alerts_cleared: metrics::get(&m.alerts_cleared),
            summaries: metrics::get(&m.summaries),
            late_events: metrics::get(&m.late_events),
            future_events: metrics::get(&m.future_events),
        }
    }

    /// The latest time a tick or event moved the replay to.
    fn processor_clock(&self) -> i64 {
        let last_tick = self.next_tick.map_or(i64::MIN, |t| t - self.tick_ms);
        last_tick.max(self.clock.unwrap_or(i64::MIN))
    }

    /// Applies every tick due at or before `until` (see [`MAX_GAP_TICKS`]).
    fn tick_through(&mut self, until: i64, out: &mut Vec<Output>) {
        let Some(mut next) = self.next_tick else { return };
        let mut applied = 0u64;
        while next <= until {
            if applied == MAX_GAP_TICKS {
                let last = until - until.rem_euclid(self.tick_ms);
                self.skipped_ticks += u64::try_from((last - next) / self.tick_ms).unwrap_or(0);
                next = last;
            }
            self.apply(&Entry::Tick { now_ms: next }, out);
            self.ticks += 1;
            applied += 1;
            next = next.saturating_add(self.tick_ms);
        }
        self.next_tick = Some(next);
    }

    fn apply(&mut self, entry: &Entry, out: &mut Vec<Output>) {
        self.seq += 1;
        self.processor.apply(self.seq, entry, &self.metrics, out);
    }
}

/// The first multiple of `step` after `t`.
fn next_multiple(t: i64, step: i64) -> i64 {
    (t.div_euclid(step).saturating_add(1)).saturating_mul(step)
}

/// One alert episode: from a raise to its clear (if it cleared).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Episode {
    /// Event time of the raise (ms).
    pub raised_ms: i64,
    /// Event time of the clear (ms); `None` while still active at the end.
    pub cleared_ms: Option<i64>,
    /// The value that raised it.
    pub value: f64,
}

impl Episode {
    fn end(&self) -> i64 {
        self.cleared_ms.unwrap_or(i64::MAX)
    }

    fn overlaps(&self, other: &Episode) -> bool {
        self.raised_ms <= other.end() && other.raised_ms <= self.end()
    }
}

/// Alert episodes of one run, by (rule, series), in raise order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Episodes {
    by_key: BTreeMap<(String, String), Vec<Episode>>,
}

impl Episodes {
    /// Takes note of an alert record.
    pub fn record(&mut self, alert: &Alert) {
        let key = (alert.rule.clone(), alert.series.clone());
        let episodes = self.by_key.entry(key).or_default();
        match alert.state {
            AlertState::Raised => episodes.push(Episode {
                raised_ms: alert.ts_ms,
                cleared_ms: None,
                value: alert.value,
            }),
            AlertState::Cleared => {
                // A clear without a raise cannot come from a fresh processor; ignore it.
                if let Some(open) = episodes.last_mut().filter(|e| e.cleared_ms.is_none()) {
                    open.cleared_ms = Some(alert.ts_ms);
                }
            }
        }
    }

    /// Number of episodes.
    pub fn len(&self) -> usize {
        self.by_key.values().map(Vec::len).sum()
    }

    /// Whether there is no episode.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How an alert episode differs between the base and the other configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Raised or cleared at another time.
    Moved,
    /// Only in the base run.
    Disappears,
    /// Only in the other run.
    Appears,
}

impl ChangeKind {
    /// The word in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Moved => "moved",
            ChangeKind::Disappears => "disappears",
            ChangeKind::Appears => "appears",
        }
    }
}

/// One changed episode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// How it changed.
    pub change: ChangeKind,
    /// The rule.
    pub rule: String,
    /// The series.
    pub series: String,
    /// The episode in the base run.
    pub base: Option<Episode>,
    /// The episode in the other run.
    pub other: Option<Episode>,
    /// Other raise time minus base raise time (ms), for moved episodes.
    pub shift_ms: Option<i64>,
}

impl Change {
    /// The earliest raise time of the change, for ordering.
    fn first_ms(&self) -> i64 {
        let base = self.base.map_or(i64::MAX, |e| e.raised_ms);
        base.min(self.other.map_or(i64::MAX, |e| e.raised_ms))
    }
}

/// The differences between two runs' episodes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Comparison {
    /// Changed episodes by first raise time, then rule and series.
    pub changes: Vec<Change>,
    /// Episodes identical in both runs.
    pub unchanged: usize,
}

/// Matches the episodes of two runs; see the module docs.
pub fn compare(base: &Episodes, other: &Episodes) -> Comparison {
    let mut result = Comparison::default();
    let empty = Vec::new();
    let mut keys: Vec<&(String, String)> = base.by_key.keys().chain(other.by_key.keys()).collect();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        let a = base.by_key.get(key).unwrap_or(&empty);
        let b = other.by_key.get(key).unwrap_or(&empty);
        let change = |change, base, other| Change {
            change,
            rule: key.0.clone(),
            series: key.1.clone(),
            base,
            other,
            shift_ms: None,
        };
        let mut paired = vec![false; b.len()];
        for episode in a {
            let pair = (0..b.len()).find(|&j| !paired[j] && episode.overlaps(&b[j]));
            let Some(j) = pair else {
                result.changes.push(change(ChangeKind::Disappears, Some(*episode), None));
                continue;
            };
            paired[j] = true;
            let moved = b[j];
            if (moved.raised_ms, moved.cleared_ms) == (episode.raised_ms, episode.cleared_ms) {
                result.unchanged += 1;
            } else {
                let mut c = change(ChangeKind::Moved, Some(*episode), Some(moved));
                c.shift_ms = Some(moved.raised_ms - episode.raised_ms);
                result.changes.push(c);
            }
        }
        for (j, episode) in b.iter().enumerate().filter(|(j, _)| !paired[*j]) {
            let _ = j;
            result.changes.push(change(ChangeKind::Appears, None, Some(*episode)));
        }
    }
    result.changes.sort_by(|x, y| {
        (x.first_ms(), &x.rule, &x.series).cmp(&(y.first_ms(), &y.rule, &y.series))
    });
    result
}

/// How records are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// An aligned table for people; the closing counts on stdout.
    #[default]
    Table,
    /// One JSON object per line (a [`RecordBody`], or a [`Change`] with `--against`); the
    /// closing counts on stderr, so stdout stays machine-readable.
    JsonLines,
}

/// What `edgewise replay` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// The recording.
    pub input: PathBuf,
    /// Series name for readings without one (two-column CSV).
    pub series: Option<String>,
    /// How records are printed.
    pub format: OutputFormat,
    /// Write the anomaly rules' scores of the base configuration to this CSV.
    pub scores: Option<PathBuf>,
    /// Draw the progress line on stderr (the caller checks that stderr is a terminal).
    pub progress: bool,
    /// Standard output is the same terminal: the progress line is erased before records are
    /// printed and drawn again only after they are flushed.
    pub records_on_terminal: bool,
}

/// A configuration and the name it goes by in messages (its file).
#[derive(Debug, Clone, Copy)]
pub struct Named<'a> {
    /// The file name, as given.
    pub name: &'a str,
    /// The configuration.
    pub config: &'a Config,
}

/// What a replay did, for the exit status and tests.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReplayReport {
    /// Counts of the base configuration.
    pub counts: Counts,
    /// Counts of the `--against` configuration.
    pub against: Option<Counts>,
    /// Lines that were not readings.
    pub bad_lines: u64,
    /// The `--against` comparison.
    pub comparison: Option<Comparison>,
    /// Rows written to the scores file.
    pub scores: u64,
}

/// Runs `edgewise replay`: reads the recording once, feeds `base` (and `against`), prints
/// records (or, with `against`, the changed episodes) to `out` and bad lines, progress and
/// (for JSON lines) the counts to `err`.
pub fn run(
    base: Named<'_>,
    against: Option<Named<'_>>,
    options: &ReplayOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<ReplayReport, ReplayError> {
    let mut replay = new_replay(base)?;
    let mut other = against.map(new_replay).transpose()?;
    let mut reader = recording::open(&options.input, None, options.series.clone())?;
    let mut scores = match &options.scores {
        Some(path) => {
            replay.record_scores(true);
            Some(ScoresFile::create(path)?)
        }
        None => None,
    };
    let total_bytes = std::fs::metadata(&options.input).map(|m| m.len()).unwrap_or(0);
    let started = Instant::now();
    let mut progress = options.progress.then(|| Progress::new(total_bytes, started));
    let mut printer = Printer::new(options.format);
    let (mut base_episodes, mut other_episodes) = (Episodes::default(), Episodes::default());
    let mut outputs = Vec::new();
    let mut other_outputs = Vec::new();
    let mut bad_lines = 0u64;
    let mut lines = 0u64;
    let input = options.input.display().to_string();

    loop {
        let line = reader.next_line()?;
        let end = line.is_none();
        lines += 1;
        if let Some(progress) =
            progress.as_mut().filter(|_| lines.is_multiple_of(PROGRESS_CHECK_LINES))
            && progress.due()
        {
            if options.records_on_terminal {
                out.flush().map_err(ReplayError::Output)?;
            }
            progress.draw(reader.bytes_read(), replay.counts().events, err);
        }
        match line {
            Some(Line::Reading(Reading { ts_ms, series, value, .. })) => {
                replay.push(ts_ms, &series, value, &mut outputs);
                if let Some(other) = other.as_mut() {
                    other.push(ts_ms, &series, value, &mut other_outputs);
                }
            }
            Some(Line::Bad(bad)) => {
                bad_lines += 1;
                if bad_lines <= SHOWN_BAD_LINES {
                    clear_progress(&mut progress, err)?;
                    writeln!(err, "{input}:{}: rejected: {}", bad.line, bad.reason)
                        .map_err(ReplayError::Output)?;
                }
            }
            None => {
                replay.finish(&mut outputs);
                if let Some(other) = other.as_mut() {
                    other.finish(&mut other_outputs);
                }
            }
        }
        if let Some(file) = scores.as_mut() {
            for sample in replay.take_scores() {
                file.push(&sample)?;
            }
        }
        if other.is_some() {
            for output in outputs.drain(..) {
                if let RecordBody::Alert(alert) = &output.body {
                    base_episodes.record(alert);
                }
            }
            for output in other_outputs.drain(..) {
                if let RecordBody::Alert(alert) = &output.body {
                    other_episodes.record(alert);
                }
            }
        } else if !outputs.is_empty() {
            if options.records_on_terminal {
                clear_progress(&mut progress, err)?;
            }
            for output in outputs.drain(..) {
                printer.record(&output.body, out).map_err(ReplayError::Output)?;
            }
        }
        if end {
            break;
        }
    }
    clear_progress(&mut progress, err)?;
    let elapsed = started.elapsed();
    let scored = match scores {
        Some(file) => file.finish()?,
        None => 0,
    };
    if let (Some(path), 0) = (&options.scores, scored) {
        writeln!(err, "{}: no event was scored (only anomaly rules score events)", path.display())
            .map_err(ReplayError::Output)?;
    }

    let mut report = ReplayReport {
        counts: replay.counts(),
        bad_lines,
        scores: scored,
        ..ReplayReport::default()
    };
    if bad_lines > SHOWN_BAD_LINES {
        writeln!(err, "{input}: {} more rejected lines not shown", bad_lines - SHOWN_BAD_LINES)
            .map_err(ReplayError::Output)?;
    }
    let mut closing = Vec::new();
    match (against, other) {
        (Some(named), Some(other)) => {
            let comparison = compare(&base_episodes, &other_episodes);
            printer
                .comparison(&comparison, base.name, named.name, out)
                .map_err(ReplayError::Output)?;
            let kinds = |kind| comparison.changes.iter().filter(|c| c.change == kind).count();
            closing.push(format!(
                "{}: {}",
                base.name,
                counts_line(&report.counts, bad_lines, elapsed)
            ));
            closing.push(format!(
                "{}: {}",
                named.name,
                counts_line(&other.counts(), bad_lines, elapsed)
            ));
            closing.push(format!(
                "alert episodes: {} unchanged, {} moved, {} disappear, {} appear",
                comparison.unchanged,
                kinds(ChangeKind::Moved),
                kinds(ChangeKind::Disappears),
                kinds(ChangeKind::Appears),
            ));
            report.against = Some(other.counts());
            report.comparison = Some(comparison);
        }
        _ => {
            printer.finish(out).map_err(ReplayError::Output)?;
            closing.push(counts_line(&report.counts, bad_lines, elapsed));
        }
    }
    let counts_to: &mut dyn Write = match options.format {
        OutputFormat::Table => &mut *out,
        OutputFormat::JsonLines => &mut *err,
    };
    for line in closing {
        writeln!(counts_to, "{line}").map_err(ReplayError::Output)?;
    }
    out.flush().map_err(ReplayError::Output)?;
    Ok(report)
}

fn new_replay(named: Named<'_>) -> Result<Replay, ReplayError> {
    Replay::new(named.config)
        .map_err(|source| ReplayError::Processor { config: named.name.into(), source })
}

/// The closing line: `1200 events, 3 rejected lines, 4 alerts raised, 3 cleared, …`.
fn counts_line(c: &Counts, bad_lines: u64, elapsed: Duration) -> String {
    let rate = c.events as f64 / elapsed.as_secs_f64().max(1e-6);
    let mut line = format!(
        "{} events, {bad_lines} rejected lines, {} alerts raised, {} cleared, {} summaries, \
         {} late, {} future events ({:.2} s, {:.0} events/s)",
        c.events,
        c.alerts_raised,
        c.alerts_cleared,
        c.summaries,
        c.late_events,
        c.future_events,
        elapsed.as_secs_f64(),
        rate,
    );
    if c.skipped_ticks > 0 {
        line.push_str(&format!("; {} ticks skipped in long gaps", c.skipped_ticks));
    }
    line
}

fn clear_progress(progress: &mut Option<Progress>, err: &mut dyn Write) -> Result<(), ReplayError> {
    match progress {
        Some(p) => p.clear(err).map_err(ReplayError::Output),
        None => Ok(()),
    }
}

/// The progress line on stderr: percentage of bytes read and events per second.
#[derive(Debug)]
struct Progress {
    total_bytes: u64,
    started: Instant,
    last_draw: Instant,
    drawn: bool,
}

impl Progress {
    fn new(total_bytes: u64, started: Instant) -> Progress {
        Progress { total_bytes, started, last_draw: started, drawn: false }
    }

    /// Whether [`PROGRESS_REDRAW`] has passed since the last draw.
    fn due(&self) -> bool {
        self.last_draw.elapsed() >= PROGRESS_REDRAW
    }

    /// Draws the line. Errors are ignored: a progress line that cannot be drawn must not stop
    /// the replay.
    fn draw(&mut self, bytes: u64, events: u64, err: &mut dyn Write) {
        let now = Instant::now();
        self.last_draw = now;
        let percent = if self.total_bytes == 0 {
            100.0
        } else {
            bytes as f64 * 100.0 / self.total_bytes as f64
        };
        let rate = events as f64 / now.duration_since(self.started).as_secs_f64().max(1e-6);
        let _ = write!(err, "\r{percent:5.1}%  {events} events  {rate:.0} events/s   ");
        let _ = err.flush();
        self.drawn = true;
    }

    /// Erases the line (before other output, and at the end).
    fn clear(&mut self, err: &mut dyn Write) -> io::Result<()> {
        if self.drawn {
            self.drawn = false;
            write!(err, "\r{:60}\r", "")?;
        }
        Ok(())
    }
}

/// Prints records as a table or JSON lines.
#[derive(Debug)]
struct Printer {
    format: OutputFormat,
    table: Table,
}

const RECORD_HEADER: [&str; 7] = ["TIME", "RECORD", "RULE", "SERIES", "STATE", "VALUE", "DETAIL"];

impl Printer {
    fn new(format: OutputFormat) -> Printer {
        Printer { format, table: Table::new(&RECORD_HEADER, TABLE_SETTLE_ROWS) }
    }

    fn record(&mut self, body: &RecordBody, out: &mut dyn Write) -> io::Result<()> {
        match self.format {
            OutputFormat::JsonLines => {
                serde_json::to_writer(&mut *out, body)?;
                out.write_all(b"\n")
            }
            OutputFormat::Table => match body {
                RecordBody::Alert(alert) => self.table.row(alert_row(alert), out),
                RecordBody::Summary(summary) => self.table.row(summary_row(summary), out),
                // The processor makes no gaps (the outbox does); nothing to show.
                RecordBody::Gap(_) => Ok(()),
            },
        }
    }

    fn finish(&mut self, out: &mut dyn Write) -> io::Result<()> {
        if self.format == OutputFormat::Table {
            if self.table.is_empty() {
                writeln!(out, "no alerts and no summaries")?;
            }
            self.table.flush(out)?;
        }
        Ok(())
    }

    fn comparison(
        &mut self,
        comparison: &Comparison,
        base: &str,
        other: &str,
        out: &mut dyn Write,
    ) -> io::Result<()> {
        if self.format == OutputFormat::JsonLines {
            for change in &comparison.changes {
                serde_json::to_writer(&mut *out, change)?;
                out.write_all(b"\n")?;
            }
            return Ok(());
        }
        if comparison.changes.is_empty() {
            return writeln!(out, "no alert episode changes between {base} and {other}");
        }
        let raised_base = format!("RAISED ({base})");
        let raised_other = format!("RAISED ({other})");
        let header = ["CHANGE", "RULE", "SERIES", &raised_base, &raised_other, "SHIFT", "DURATION"];
        let mut table = Table::new(&header, usize::MAX);
        for c in &comparison.changes {
            let raised = |e: Option<Episode>| e.map_or("-".into(), |e| format_ms(e.raised_ms));
            let duration = |e: Option<Episode>| {
                e.map_or("-".to_string(), |e| match e.cleared_ms {
                    Some(cleared) => format_shift(cleared - e.raised_ms, false),
                    None => "active at end".into(),
                })
            };
            let duration = match c.change {
                ChangeKind::Moved => format!("{} → {}", duration(c.base), duration(c.other)),
                ChangeKind::Disappears => duration(c.base),
                ChangeKind::Appears => duration(c.other),
            };
            table.row(
                vec![
                    c.change.as_str().into(),
                    c.rule.clone(),
                    c.series.clone(),
                    raised(c.base),
                    raised(c.other),
                    c.shift_ms.map_or("-".into(), |s| format_shift(s, true)),
                    duration,
                ],
                out,
            )?;
        }
        table.flush(out)
    }
}

fn alert_row(a: &Alert) -> Vec<String> {
    let state = match a.state {
        AlertState::Raised => "raised",
        AlertState::Cleared => "cleared",
    };
    let severity = match a.severity {
        sensors::record::Severity::Info => "info",
        sensors::record::Severity::Warning => "warning",
        sensors::record::Severity::Critical => "critical",
    };
    vec![
        format_ms(a.ts_ms),
        "alert".into(),
        a.rule.clone(),
        a.series.clone(),
        state.into(),
        format_value(a.value),
        format!("{severity}, threshold {}: {}", format_value(a.threshold), a.message),
    ]
}

fn summary_row(s: &Summary) -> Vec<String> {
    vec![
        format_ms(s.start_ms),
        "summary".into(),
        "-".into(),
        s.series.clone(),
        "-".into(),
        format_value(s.mean),
        format!(
            "{} window: n={} min={} max={} sd={} first={} last={}",
            format_shift(i64::try_from(s.window_ms).unwrap_or(i64::MAX), false),
            s.count,
            format_value(s.min),
            format_value(s.max),
            format_value(s.stddev),
            format_value(s.first),
            format_value(s.last),
        ),
    ]
}

/// A value for people: three decimals without trailing zeros, scientific when tiny or huge.
pub fn format_value(v: f64) -> String {
    if v != 0.0 && !(1e-3..1e12).contains(&v.abs()) {
        return format!("{v:.3e}");
    }
    let text = format!("{v:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" { "0".into() } else { text.into() }
}

/// A duration in ms for people (`4s`, `1m 30s`, `250ms`), signed when `sign`.
fn format_shift(ms: i64, sign: bool) -> String {
    let magnitude = humantime::format_duration(Duration::from_millis(ms.unsigned_abs()));
    match (sign, ms.signum()) {
        (true, -1) => format!("-{magnitude}"),
        (true, 1) => format!("+{magnitude}"),
        _ => magnitude.to_string(),
    }
}

/// A table whose column widths are fixed by its first rows (see [`TABLE_SETTLE_ROWS`]).
#[derive(Debug)]
struct Table {
    header: Vec<String>,
    widths: Vec<usize>,
    pending: Vec<Vec<String>>,
    settle_rows: usize,
    settled: bool,
    rows: usize,
}

impl Table {
    fn new(header: &[&str], settle_rows: usize) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            widths: header.iter().map(|h| h.chars().count()).collect(),
            pending: Vec::new(),
            settle_rows,
            settled: false,
            rows: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.rows == 0
    }

    fn row(&mut self, row: Vec<String>, out: &mut dyn Write) -> io::Result<()> {
        self.rows += 1;
        if self.settled {
            return self.write(&row, out);
        }
        self.pending.push(row);
        if self.pending.len() >= self.settle_rows {
            self.flush(out)?;
        }
        Ok(())
    }

    /// Fixes the widths (if not yet) and writes what is pending.
    fn flush(&mut self, out: &mut dyn Write) -> io::Result<()> {
        if !self.settled {
            if self.pending.is_empty() {
                return Ok(());
            }
            self.settled = true;
            for row in &self.pending {
                for (w, cell) in self.widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            let header = self.header.clone();
            self.write(&header, out)?;
        }
        for row in std::mem::take(&mut self.pending) {
            self.write(&row, out)?;
        }
        Ok(())
    }

    fn write(&mut self, row: &[String], out: &mut dyn Write) -> io::Result<()> {
        let last = row.len().saturating_sub(1);
        let mut line = String::with_capacity(128);
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                line.push_str(cell);
                break;
            }
            let width = &mut self.widths[i];
            *width = (*width).max(cell.chars().count());
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', *width - cell.chars().count() + 2));
        }
        writeln!(out, "{}", line.trim_end())
    }
}

/// The `--scores` CSV: `timestamp,value,anomaly_score`, plus `rule,series` columns when more
/// than one (rule, series) was scored.
///
/// Whether there is more than one is known only at the end, and a long recording's scores
/// must not wait in memory: rows go, with all five columns, to `<out>.rows.partial`; at the
/// end they are copied under the right header to `<out>.partial`, cut to three columns if one
/// key was scored, and that file is renamed to `<out>`. The first three fields (an RFC 3339
/// time and two numbers) never hold a comma, so cutting is taking the text before the third.
#[derive(Debug)]
struct ScoresFile {
    path: PathBuf,
    rows_path: PathBuf,
    rows: BufWriter<File>,
    first_key: Option<(String, String)>,
    several: bool,
    count: u64,
}

impl ScoresFile {
    fn create(path: &Path) -> Result<ScoresFile, ReplayError> {
        let rows_path = sibling(path, ".rows.partial");
        let file = File::create(&rows_path).map_err(|source| ReplayError::Scores {
            action: "create",
            path: path.to_path_buf(),
            source,
        })?;
        Ok(ScoresFile {
            path: path.to_path_buf(),
            rows_path,
            rows: BufWriter::new(file),
            first_key: None,
            several: false,
            count: 0,
        })
    }

    fn error(&self, action: &'static str) -> impl FnOnce(io::Error) -> ReplayError + '_ {
        move |source| ReplayError::Scores { action, path: self.path.clone(), source }
    }

    fn push(&mut self, s: &ScoreSample) -> Result<(), ReplayError> {
        match &self.first_key {
            None => self.first_key = Some((s.rule.clone(), s.series.clone())),
            Some((rule, series)) => self.several |= *rule != s.rule || *series != s.series,
        }
        self.count += 1;
        let row = format!(
            "{},{},{},{},{}\n",
            format_ms(s.ts_ms),
            s.value,
            s.score,
            csv_field(&s.rule),
            csv_field(&s.series)
        );
        self.rows.write_all(row.as_bytes()).map_err(|source| ReplayError::Scores {
            action: "write",
            path: self.path.clone(),
            source,
        })
    }

    /// Writes the final file; returns the number of rows.
    fn finish(mut self) -> Result<u64, ReplayError> {
        use std::io::BufRead;
        self.rows.flush().map_err(self.error("write"))?;
        let rows = File::open(&self.rows_path).map_err(self.error("read back"))?;
        let mut out = AtomicFile::create(&self.path).map_err(self.error("create"))?;
        let w = out.writer();
        let header = if self.several {
            "timestamp,value,anomaly_score,rule,series"
        } else {
            "timestamp,value,anomaly_score"
        };
        writeln!(w, "{header}").map_err(self.error("write"))?;
        for line in io::BufReader::new(rows).lines() {
            let line = line.map_err(self.error("read back"))?;
            let keep = match line.match_indices(',').nth(2) {
                Some((i, _)) if !self.several => &line[..i],
                _ => line.as_str(),
            };
            writeln!(w, "{keep}").map_err(self.error("write"))?;
        }
        out.commit().map_err(self.error("write"))?;
        Ok(self.count)
    }
}

impl Drop for ScoresFile {
    /// The rows file is scratch, whether the replay finished or failed.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.rows_path);
    }
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// The sibling `<name><suffix>` of `path`, for files written before they are complete.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// A file written under a temporary name (`<name>.partial`) and renamed into place when
/// complete, so that a failed run never leaves a truncated file that looks finished; dropped
/// without [`AtomicFile::commit`], the partial file is removed.
#[derive(Debug)]
pub struct AtomicFile {
    path: PathBuf,
    partial: PathBuf,
    file: BufWriter<File>,
}

impl AtomicFile {
    /// Creates `<path>.partial`.
    pub fn create(path: &Path) -> io::Result<AtomicFile> {
        let partial = sibling(path, ".partial");
        let file = BufWriter::new(File::create(&partial)?);
        Ok(AtomicFile { path: path.to_path_buf(), partial, file })
    }

    /// The writer.
    pub fn writer(&mut self) -> &mut BufWriter<File> {
        &mut self.file
    }

    /// Flushes, syncs and renames the file into place.
    pub fn commit(mut self) -> io::Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_all()?;
        std::fs::rename(&self.partial, &self.path)
    }
}

impl Drop for AtomicFile {
    /// Removes the partial file of a write that was never committed (after a commit there is
    /// nothing left to remove).
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.partial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
        [agent]
        id = "test"

        [journal]
        tick_interval = "1s"

        [[rules]]
        kind = "threshold"
        name = "hot"
        series = "+/temperature"
        above = 50.0
        clear = 40.0

        [summary]
        window = "10s"
        allowed_lateness = "2s"

        [upstream]
        kind = "file"
        path = "out.jsonl"
    "#;

    fn config() -> Config {
        Config::from_toml(CONFIG).unwrap()
    }

    fn alerts(out: &[Output]) -> Vec<(AlertState, i64)> {
        out.iter()
            .filter_map(|o| match &o.body {
                RecordBody::Alert(a) => Some((a.state, a.ts_ms)),
                _ => None,
            })
            .collect()
    }

    fn summaries(out: &[Output]) -> Vec<(i64, u64)> {
        out.iter()
            .filter_map(|o| match &o.body {
                RecordBody::Summary(s) => Some((s.start_ms, s.count)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn ticks_are_applied_at_each_multiple_of_the_interval_that_event_time_passes() {
        let mut replay = Replay::new(&config()).unwrap();
        let mut out = Vec::new();
        replay.push(10_500, "a/temperature", 1.0, &mut out);
        assert_eq!(replay.counts().ticks, 0);
        replay.push(10_900, "a/temperature", 1.0, &mut out);
        assert_eq!(replay.counts().ticks, 0);
        replay.push(14_000, "a/temperature", 1.0, &mut out); // passes 11, 12, 13, 14 s
        assert_eq!(replay.counts().ticks, 4);
        replay.push(12_000, "a/temperature", 1.0, &mut out); // older: no tick
        assert_eq!(replay.counts().ticks, 4);
        assert_eq!(replay.counts().events, 4);
    }

    #[test]
    fn finishing_closes_every_open_window() {
        let mut replay = Replay::new(&config()).unwrap();
        let mut out = Vec::new();
        for (ts, v) in [(1_000, 1.0), (5_000, 2.0), (12_000, 3.0), (19_999, 4.0)] {
            replay.push(ts, "a/temperature", v, &mut out);
        }
        // The window [0, 10 s) closed at 12 s on the clock; [10 s, 20 s) is still open.
        assert_eq!(summaries(&out), [(0, 2)]);
        replay.finish(&mut out);
        assert_eq!(summaries(&out), [(0, 2), (10_000, 2)]);
        let ticks = replay.counts().ticks;
        replay.finish(&mut out);
        assert_eq!(replay.counts().ticks, ticks, "finish is idempotent");
    }

    #[test]
    fn alerts_follow_event_time_and_out_of_order_readings_are_judged_late() {
        let mut replay = Replay::new(&config()).unwrap();
        let mut out = Vec::new();
        for (ts, v) in [(1_000, 45.0), (2_000, 55.0), (3_000, 35.0), (30_000, 1.0), (4_000, 60.0)] {
            replay.push(ts, "a/temperature", v, &mut out);
        }
        replay.finish(&mut out);
        // The late reading still reaches the rules (as live), but not its closed window.
        assert_eq!(
            alerts(&out),
            [
                (AlertState::Raised, 2_000),
                (AlertState::Cleared, 3_000),
                (AlertState::Raised, 4_000)
            ]
        );
        assert_eq!(replay.counts().late_events, 1);
        assert_eq!(summaries(&out), [(0, 3), (30_000, 1)]);
    }

    #[test]
    fn a_gap_longer_than_the_tick_budget_is_bridged_by_one_tick() {
        let mut replay = Replay::new(&config()).unwrap();
        let mut out = Vec::new();
        replay.push(0, "a/temperature", 1.0, &mut out);
        let far = (MAX_GAP_TICKS as i64 + 500) * 1_000 + 250;
        replay.push(far, "a/temperature", 1.0, &mut out);
        let counts = replay.counts();
        assert_eq!(counts.ticks, MAX_GAP_TICKS + 1);
        assert_eq!(counts.ticks + counts.skipped_ticks, MAX_GAP_TICKS + 500);
    }

    fn episode(raised_ms: i64, cleared_ms: Option<i64>) -> Episode {
        Episode { raised_ms, cleared_ms, value: 0.0 }
    }

    fn episodes(list: &[(&str, i64, Option<i64>)]) -> Episodes {
        let mut e = Episodes::default();
        for (series, raised, cleared) in list {
            e.by_key
                .entry(("hot".to_string(), series.to_string()))
                .or_default()
                .push(episode(*raised, *cleared));
        }
        e
    }

    #[test]
    fn episodes_pair_by_overlap_and_report_moves_disappearances_and_appearances() {
        let base = episodes(&[
            ("a", 1_000, Some(5_000)),
            ("a", 10_000, Some(12_000)),
            ("b", 3_000, None),
            ("c", 7_000, Some(8_000)),
        ]);
        let other =
            episodes(&[("a", 2_500, Some(5_000)), ("b", 3_000, None), ("c", 20_000, Some(21_000))]);
        let comparison = compare(&base, &other);
        assert_eq!(comparison.unchanged, 1);
        let summary: Vec<_> =
            comparison.changes.iter().map(|c| (c.change, c.series.as_str(), c.shift_ms)).collect();
        assert_eq!(
            summary,
            [
                (ChangeKind::Moved, "a", Some(1_500)),
                (ChangeKind::Disappears, "c", None),
                (ChangeKind::Disappears, "a", None),
                (ChangeKind::Appears, "c", None),
            ]
        );
    }

    #[test]
    fn episodes_are_built_from_raise_and_clear_records() {
        let alert = |state, ts_ms| Alert {
            rule: "hot".into(),
            series: "a".into(),
            state,
            severity: sensors::record::Severity::Warning,
            ts_ms,
            value: 1.0,
            threshold: 0.0,
            message: String::new(),
            labels: Default::default(),
        };
        let mut e = Episodes::default();
        e.record(&alert(AlertState::Cleared, 1)); // ignored: nothing open
        e.record(&alert(AlertState::Raised, 2));
        e.record(&alert(AlertState::Cleared, 3));
        e.record(&alert(AlertState::Raised, 4));
        assert_eq!(e.len(), 2);
        assert_eq!(
            e.by_key[&("hot".to_string(), "a".to_string())],
            [episode(2, Some(3)), episode(4, None)].map(|x| Episode { value: 1.0, ..x })
        );
    }

    #[test]
    fn values_print_with_at_most_three_decimals() {
        assert_eq!(format_value(82.5), "82.5");
        assert_eq!(format_value(80.0), "80");
        assert_eq!(format_value(-0.0001), "-1.000e-4");
        assert_eq!(format_value(1.23456), "1.235");
        assert_eq!(format_value(-0.0), "0");
        assert_eq!(format_shift(-90_000, true), "-1m 30s");
        assert_eq!(format_shift(4_000, true), "+4s");
    }

    #[test]
    fn the_table_aligns_columns_to_the_widest_cell_of_its_first_rows() {
        let mut table = Table::new(&["A", "BB", "C"], 2);
        let mut out = Vec::new();
        table.row(vec!["xxx".into(), "y".into(), "last".into()], &mut out).unwrap();
        assert!(out.is_empty(), "waits for the rows that fix the widths");
        table.row(vec!["x".into(), "yyyy".into(), "z".into()], &mut out).unwrap();
        table.row(vec!["x".into(), "y".into(), "z".into()], &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "A    BB    C\nxxx  y     last\nx    yyyy  z\nx    y     z\n"
        );
    }

    #[test]
    fn the_driver_prints_records_and_counts_and_skips_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("r.csv");
        std::fs::write(
            &input,
            "timestamp,value\n1718000001000,55\n1718000002000,oops\n1718000003000,35\n",
        )
        .unwrap();
        let config = config();
        let options = ReplayOptions {
            input,
            series: Some("a/temperature".into()),
            format: OutputFormat::JsonLines,
            scores: None,
            progress: false,
            records_on_terminal: false,
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let report =
            run(Named { name: "c.toml", config: &config }, None, &options, &mut out, &mut err)
                .unwrap();
        assert_eq!((report.counts.events, report.bad_lines), (2, 1));
        let out = String::from_utf8(out).unwrap();
        let err = String::from_utf8(err).unwrap();
        assert_eq!(out.lines().count(), 3, "raise, clear, one summary:\n{out}\n{err}");
        assert!(out.lines().all(|l| serde_json::from_str::<RecordBody>(l).is_ok()), "{out}");
        assert!(err.contains("r.csv:3: rejected: value `oops` is not a number"), "{err}");
        assert!(err.contains("2 events, 1 rejected lines, 1 alerts raised, 1 cleared"), "{err}");
    }
}
