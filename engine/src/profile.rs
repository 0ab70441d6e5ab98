//! Where the time goes: named spans summed per name, recorded only when `OMNI_PROFILE=1`.
//!
//! The benches print the table after their run (`omni bench latency` etc. with `OMNI_PROFILE=1`),
//! so a run on a lent machine says which operation to work on next without a profiler there. Spans
//! are taken on the calling thread around whole operations (a matmul, an MoE sweep), never inside the
//! worker pool; nested spans each count their own time, so the table's rows overlap by design (a
//! stage total and the operations inside it). With the variable unset a span is one relaxed load.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Calls and total nanoseconds of one span name within one stage.
struct Entry {
    stage: Option<&'static str>,
    name: &'static str,
    calls: u64,
    nanos: u128,
}

/// Per (stage, name), in first-seen order.
static TOTALS: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
static FORCED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The model stage this thread is running (see [`stage`]).
    static STAGE: Cell<Option<&'static str>> = const { Cell::new(None) };
}

/// Whether spans are recorded (`OMNI_PROFILE` set to anything but `0`, or [`force`]).
pub fn enabled() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    FORCED.load(Ordering::Relaxed)
        || *ENV.get_or_init(|| std::env::var("OMNI_PROFILE").map(|v| !v.is_empty() && v != "0").unwrap_or(false))
}

/// Turns recording on regardless of the environment (tests of this module).
pub fn force(on: bool) {
    FORCED.store(on, Ordering::Relaxed);
}

/// A running span: adds its elapsed time to `name` when dropped.
#[must_use = "a span measures until it is dropped"]
pub struct Span {
    name: &'static str,
    start: Option<Instant>,
}

pub fn span(name: &'static str) -> Span {
    Span { name, start: enabled().then(Instant::now) }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(start) = self.start {
            record(STAGE.with(Cell::get), self.name, start.elapsed().as_nanos());
        }
    }
}

/// Marks the spans this thread records until the guard drops as belonging to `name` (a model stage:
/// "talker prefill", "audio encoder"), so that operations shared by several stages (a Q8_0 product,
/// an RMS norm) get one row per stage. Stages run their forward on one pool worker, where the guard
/// is taken; nested stages take the inner name.
pub fn stage(name: &'static str) -> StageGuard {
    let set = enabled();
    let previous = if set { STAGE.with(|s| s.replace(Some(name))) } else { None };
    StageGuard { previous, set }
}

#[must_use = "the stage lasts until the guard is dropped"]
pub struct StageGuard {
    previous: Option<&'static str>,
    set: bool,
}

impl Drop for StageGuard {
    fn drop(&mut self) {
        if self.set {
            STAGE.with(|s| s.set(self.previous));
        }
    }
}

fn record(stage: Option<&'static str>, name: &'static str, nanos: u128) {
    let Ok(mut totals) = TOTALS.lock() else { return };
    match totals.iter_mut().find(|e| e.stage == stage && e.name == name) {
        Some(entry) => {
            entry.calls += 1;
            entry.nanos += nanos;
        }
        None => totals.push(Entry { stage, name, calls: 1, nanos }),
    }
}

/// Tells a `perf record --control fifo:FIFO` run to start (`"enable"`) or stop (`"disable"`)
/// sampling, where `OMNI_PERF_CTL_FIFO` names that FIFO: the benches wrap their measured part so that
/// a profile on a lent machine leaves out loading and the random weights. Does nothing without it.
pub fn perf_control(command: &str) {
    if let Some(path) = std::env::var_os("OMNI_PERF_CTL_FIFO") {
        if let Ok(mut fifo) = std::fs::OpenOptions::new().write(true).open(path) {
            use std::io::Write;
            let _ = writeln!(fifo, "{command}");
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SpanTotal {
    pub name: String,
    pub calls: u64,
    pub total_ms: f64,
}

/// The totals so far, and a fresh start.
pub fn take() -> Vec<SpanTotal> {
    let Ok(mut totals) = TOTALS.lock() else { return Vec::new() };
    std::mem::take(&mut *totals)
        .into_iter()
        .map(|e| SpanTotal {
            name: match e.stage {
                Some(stage) if stage != e.name => format!("{stage}: {}", e.name),
                _ => e.name.to_string(),
            },
            calls: e.calls,
            total_ms: e.nanos as f64 / 1e6,
        })
        .collect()
}

/// The totals as an aligned table, largest first (empty when nothing was recorded).
pub fn table(rows: &[SpanTotal]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut rows = rows.to_vec();
    rows.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    let mut out = format!("{:<width$}  {:>8}  {:>10}  {:>9}\n", "span", "calls", "total ms", "ms/call");
    for r in rows {
        out += &format!(
            "{:<width$}  {:>8}  {:>10.1}  {:>9.3}\n",
            r.name,
            r.calls,
            r.total_ms,
            r.total_ms / r.calls.max(1) as f64
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_sum_per_name() {
        force(true);
        let _ = take();
        for _ in 0..3 {
            let _s = span("profile test a");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        drop(span("profile test b"));
        let rows = take();
        {
            let _stage = stage("profile test stage");
            drop(span("profile test b"));
        }
        drop(span("profile test b"));
        let staged = take();
        force(false);
        assert_eq!(staged.iter().find(|r| r.name == "profile test stage: profile test b").map(|r| r.calls), Some(1));
        assert_eq!(staged.iter().find(|r| r.name == "profile test b").map(|r| r.calls), Some(1));
        let a = rows.iter().find(|r| r.name == "profile test a").expect("span a recorded");
        assert_eq!(a.calls, 3);
        assert!(a.total_ms >= 6.0, "three 2 ms sleeps took {} ms", a.total_ms);
        assert_eq!(rows.iter().find(|r| r.name == "profile test b").map(|r| r.calls), Some(1));
        assert!(table(&rows).lines().nth(1).is_some_and(|l| l.starts_with("profile test a")));
        // Other tests may record spans meanwhile (recording is process-wide); ours were taken.
        assert!(!take().iter().any(|r| r.name.starts_with("profile test")));
    }
}
