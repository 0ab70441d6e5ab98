//! What every bench reports beside its numbers: the machine, the threads, the weights, and a
//! small table printer; plus the real config with fewer Thinker layers for small machines.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::Value as Json;

use super::random_weights::{GeneratedArena, RandomQuant};
use crate::weights::WeightStore;

/// The Thinker's layer count in the real config.
pub const REAL_THINKER_LAYERS: usize = 48;

/// Sets the thread count of candle's pools (rayon's global pool and candle's matmul pool read
/// `RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS` when they start, so this must run before any tensor
/// work). `None` keeps the environment's choice (default: physical cores). Returns what is used.
pub fn set_threads(threads: Option<usize>) -> Result<usize> {
    if let Some(t) = threads {
        if t == 0 || t > 1024 {
            bail!("--threads must be in 1..=1024, got {t}");
        }
        // Edition 2021: set_var is safe; we are still single-threaded here (before any pool starts).
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", t.to_string());
    }
    Ok(candle_core::utils::get_num_threads())
}

/// Facts printed with every result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MachineFacts {
    pub cpu_model: String,
    pub logical_cpus: usize,
    pub mem_total_gib: f64,
    /// Threads candle uses (`candle_core::utils::get_num_threads`).
    pub threads: usize,
    pub rayon_num_threads_env: Option<String>,
    pub candle_num_threads_env: Option<String>,
    pub load_average: Option<String>,
    /// CPU seconds this process used so far (user + system) and its wall seconds: their ratio shows
    /// how many cores the bench really got on a shared machine.
    pub process_cpu_s: Option<f64>,
    pub process_wall_s: Option<f64>,
    pub omni_version: String,
    /// Which Q8_0 matmul ran: the engine's kernels (`engine/src/quant`) or candle's `QMatMul`.
    pub q8_0_matmul: String,
}

/// (CPU seconds, wall seconds) of this process, from /proc/self/stat.
fn process_times() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime, stime are fields 14, 15; starttime 22.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let start: f64 = f.get(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(((utime + stime) / tick, uptime - start / tick))
}

impl MachineFacts {
    pub fn collect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total_gib = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0 / 1024.0)
            .unwrap_or(0.0);
        Self {
            cpu_model,
            logical_cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            mem_total_gib,
            threads: candle_core::utils::get_num_threads(),
            rayon_num_threads_env: std::env::var("RAYON_NUM_THREADS").ok(),
            candle_num_threads_env: std::env::var("CANDLE_NUM_THREADS").ok(),
            load_average: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
            process_cpu_s: process_times().map(|t| t.0),
            process_wall_s: process_times().map(|t| t.1),
            omni_version: env!("CARGO_PKG_VERSION").to_string(),
            q8_0_matmul: if crate::quant::enabled() {
                format!(
                    "omni tiles ({:?}{})",
                    crate::quant::q8_0::kernel_variant(),
                    if crate::quant::amx_available() { "; AMX from 4 rows" } else { "" }
                )
            } else {
                "candle QMatMul".into()
            },
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "machine: {} ({} logical CPUs, {:.0} GiB), candle threads {}, load {}, process CPU {:.0} s in {:.0} s wall, Q8_0 matmul: {}",
            self.cpu_model,
            self.logical_cpus,
            self.mem_total_gib,
            self.threads,
            self.load_average.as_deref().unwrap_or("?"),
            self.process_cpu_s.unwrap_or(f64::NAN),
            self.process_wall_s.unwrap_or(f64::NAN),
            self.q8_0_matmul,
        )
    }
}

/// The real config.json as a value, with the Thinker cut to `thinker_layers` when given.
pub fn real_config_json(thinker_layers: Option<usize>) -> Result<Json> {
    let mut json: Json =
        serde_json::from_str(super::REAL_CONFIG).context("the bundled real config")?;
    if let Some(n) = thinker_layers {
        if n == 0 || n > REAL_THINKER_LAYERS {
            bail!("--layers must be in 1..={REAL_THINKER_LAYERS}, got {n}");
        }
        let layers = json
            .pointer_mut("/thinker_config/text_config/num_hidden_layers")
            .context("real config: thinker_config.text_config.num_hidden_layers")?;
        *layers = Json::from(n);
    }
    Ok(json)
}

/// A random weight store for `config` and the time it took to set up (names only: the values are
/// made when the loaders ask).
pub fn random_store(config: &Json, seed: u64) -> Result<WeightStore> {
    WeightStore::random(config, seed, RandomQuant::Q8_0)
}

/// What the random store generated (component, GB, seconds).
pub fn generated(store: &WeightStore) -> Vec<GeneratedArena> {
    store
        .random_source()
        .map(|r| r.generated())
        .unwrap_or_default()
}

/// Milliseconds since `t`.
pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// A two-or-three column text table.
#[derive(Default)]
pub struct Table {
    title: String,
    rows: Vec<(String, String, String)>,
}

impl Table {
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            rows: Vec::new(),
        }
    }

    pub fn row(
        &mut self,
        what: impl Into<String>,
        value: impl Into<String>,
        note: impl Into<String>,
    ) {
        self.rows.push((what.into(), value.into(), note.into()));
    }

    pub fn render(&self) -> String {
        let w0 = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let w1 = self.rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
        let mut s = format!("{}\n", self.title);
        for (a, b, c) in &self.rows {
            let line = format!("  {a:<w0$}  {b:>w1$}  {c}");
            s.push_str(line.trim_end());
            s.push('\n');
        }
        s
    }
}

/// Lines describing the random weights made.
pub fn generated_lines(gen: &[GeneratedArena]) -> Vec<String> {
    gen.iter()
        .map(|g| {
            format!(
                "random Q8_0 {}: {:.2} GB ({} matrices) made in {:.1} s on {} threads",
                g.component,
                g.bytes as f64 / 1e9,
                g.matrices,
                g.seconds,
                g.threads
            )
        })
        .collect()
}

/// A bench's rendered table followed by its random-weights lines and notes (every bench's footer).
pub fn with_footer(mut table: String, weights: &[GeneratedArena], notes: &[String]) -> String {
    for l in generated_lines(weights) {
        table.push_str(&format!("  {l}\n"));
    }
    for n in notes {
        table.push_str(&format!("  note: {n}\n"));
    }
    table
}

/// The real config's audio tower, Talker and Code2Wav sections (the benches' speech stages).
pub fn speech_stage_configs(
    cfg: &crate::config::OmniConfig,
) -> Result<(crate::config::AudioEncoderConfig, crate::config::TalkerConfig, crate::config::Code2WavConfig)> {
    Ok((
        cfg.thinker_config.audio_config.clone().context("real config has an audio encoder")?,
        cfg.talker_config.clone().context("real config has a talker")?,
        cfg.code2wav_config.clone().context("real config has code2wav")?,
    ))
}

/// Memory read bandwidth in GB/s: every rayon worker sums its share of a `bytes`-byte buffer (made
/// and touched first, so no page faults are timed); best of three passes. Decode of a large model
/// streams its active weights once per token, so `active bytes / this` is the decode floor.
pub fn read_bandwidth_gbs(bytes: usize) -> f64 {
    use rayon::prelude::*;
    let words = (bytes / 8).max(1 << 20);
    let buf: Vec<u64> = (0..words as u64).into_par_iter().map(|i| i ^ 0x9e37).collect();
    let mut best = f64::INFINITY;
    let mut check = 0u64;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let s: u64 = buf.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v))).reduce(|| 0, u64::wrapping_add);
        best = best.min(t.elapsed().as_secs_f64());
        check ^= s;
    }
    std::hint::black_box(check);
    (words * 8) as f64 / best / 1e9
}
