//! Helpers of the live-loop tests: running `omni talk`, reading its JSON events, a private
//! PulseAudio daemon (tests/audio/pulse.sh) and a real-time feeder for its virtual microphone.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

pub fn omni() -> &'static str {
    env!("CARGO_BIN_EXE_omni")
}

/// 16 kHz mono samples of a 16-bit WAV.
pub fn read_wav_i16(path: &Path) -> (Vec<i16>, u32) {
    let mut r = hound::WavReader::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let rate = r.spec().sample_rate;
    (r.samples::<i16>().map(|s| s.unwrap()).collect(), rate)
}

pub fn write_wav_i16(path: &Path, samples: &[i16], rate: u32) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &s in samples {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
}

/// The speech clip of the fixtures (1.83 s of espeak-ng speech, 16 kHz).
pub fn speech() -> Vec<i16> {
    read_wav_i16(&repo("tests/fixtures/audio/speech_16k_s16.wav")).0
}

/// A running private PulseAudio daemon; stopped on drop.
pub struct Pulse {
    pub dir: tempfile::TempDir,
}

impl Pulse {
    /// Starts it (with the speakerphone echo path when `echo`); a daemon that cannot start fails the
    /// test (never a silent skip).
    pub fn start(echo: bool) -> Self {
        let dir = tempfile::Builder::new().prefix("omni-pulse").tempdir().unwrap();
        let mut cmd = Command::new("bash");
        cmd.arg(repo("tests/audio/pulse.sh")).arg("start").arg(dir.path());
        if echo {
            cmd.arg("echo");
        }
        let out = cmd.output().expect("cannot run tests/audio/pulse.sh");
        assert!(
            out.status.success(),
            "PulseAudio did not start (tests/audio/pulse.sh): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        let d = self.dir.path().display().to_string();
        vec![
            ("XDG_RUNTIME_DIR".into(), d.clone()),
            ("PULSE_SERVER".into(), format!("unix:{d}/pulse/native")),
            ("PULSE_CLIENTCONFIG".into(), "/dev/null".into()),
            ("OMNI_AUDIO_HOST".into(), "pulseaudio".into()),
        ]
    }

    pub fn fifo(&self) -> PathBuf {
        self.dir.path().join("mic.fifo")
    }
}

impl Drop for Pulse {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo("tests/audio/pulse.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes the virtual microphone's FIFO at real-time pace (20 ms chunks): queued speech, else
/// silence — a real microphone never stops delivering samples.
pub struct MicFeeder {
    queue: Arc<Mutex<VecDeque<i16>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MicFeeder {
    pub fn start(fifo: &Path) -> Self {
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (q, s) = (queue.clone(), stop.clone());
        let path = fifo.to_path_buf();
        let thread = std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("cannot open the mic FIFO");
            let start = Instant::now();
            let mut i = 0u64;
            let mut buf = Vec::with_capacity(640);
            while !s.load(Ordering::Relaxed) {
                let due = start + Duration::from_millis(20 * i);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                i += 1;
                buf.clear();
                {
                    let mut q = q.lock().unwrap();
                    for _ in 0..320 {
                        let x: i16 = q.pop_front().unwrap_or(0);
                        buf.extend_from_slice(&x.to_le_bytes());
                    }
                }
                if f.write_all(&buf).is_err() {
                    break;
                }
            }
        });
        Self {
            queue,
            stop,
            thread: Some(thread),
        }
    }

    /// Queues `samples` (16 kHz) after whatever is queued.
    pub fn speak(&self, samples: &[i16]) {
        self.queue.lock().unwrap().extend(samples.iter().copied());
    }

    pub fn idle(&self) -> bool {
        self.queue.lock().unwrap().is_empty()
    }
}

impl Drop for MicFeeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A running `omni talk --json` with its events.
pub struct Talk {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    events: std::sync::mpsc::Receiver<Value>,
    pub seen: Vec<Value>,
}

impl Talk {
    pub fn spawn(args: &[&str], env: &[(String, String)]) -> Self {
        let mut cmd = Command::new(omni());
        cmd.arg("talk")
            .arg("--json")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("cannot start omni talk");
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(e) => panic!("omni talk printed a line that is not JSON ({e}): {line}"),
                }
            }
        });
        Self {
            child,
            stdin,
            events: rx,
            seen: Vec::new(),
        }
    }

    /// Next event satisfying `pred` (all events are kept in `seen`); panics after `timeout`.
    pub fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now()).unwrap_or_else(|| {
                let _ = self.child.kill();
                panic!("timed out waiting for {what}; events: {}", self.digest())
            });
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(_) => panic!("omni talk ended before {what}; events: {}", self.digest()),
            }
        }
    }

    pub fn event(&mut self, name: &str, timeout: Duration) -> Value {
        self.wait_for(name, timeout, |v| v["event"] == name)
    }

    pub fn send_line(&mut self, line: &str) {
        let s = self.stdin.as_mut().expect("stdin");
        writeln!(s, "{line}").unwrap();
        s.flush().unwrap();
    }

    /// Waits for the process to end; returns the summary (the last line).
    pub fn finish(mut self, timeout: Duration) -> (Value, Vec<Value>) {
        let summary = self.wait_for("the summary", timeout, |v| v.get("turns").is_some());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "omni talk failed: {status}");
        (summary, self.seen)
    }

    /// The events seen, without level/counter noise, for failure messages.
    pub fn digest(&self) -> String {
        let keep: Vec<String> = self
            .seen
            .iter()
            .filter(|v| v["event"] != "level" && v["event"] != "counters" && v["event"] != "text_delta")
            .map(|v| {
                let s = v.to_string();
                s.chars().take(300).collect()
            })
            .collect();
        keep.join("\n")
    }
}

pub fn count(events: &[Value], name: &str) -> usize {
    events.iter().filter(|v| v["event"] == name).count()
}

/// Reads a whole `omni talk --json` run of a finished process's stdout.
pub fn parse_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}
