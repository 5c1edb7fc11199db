//! A progress line on stderr for long copies into the cache. It appears
//! only after the copy has run for a moment (small inputs never show one),
//! and only when the caller decided stderr is a terminal.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::format::human_size;

/// Nothing is drawn for copies that finish sooner than this.
const DELAY: Duration = Duration::from_millis(400);
/// Least time between two redraws.
const INTERVAL: Duration = Duration::from_millis(150);
const BAR_WIDTH: usize = 30;

/// A reader that draws how much of it has been read.
pub struct Progress<R> {
    inner: R,
    label: String,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_draw: Option<Instant>,
}

impl<R> Progress<R> {
    pub fn new(inner: R, label: String, total: Option<u64>) -> Progress<R> {
        Progress {
            inner,
            label,
            total,
            done: 0,
            started: Instant::now(),
            last_draw: None,
        }
    }

    fn maybe_draw(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.started) < DELAY {
            return;
        }
        if let Some(last) = self.last_draw
            && now.duration_since(last) < INTERVAL
        {
            return;
        }
        self.last_draw = Some(now);
        let elapsed = now.duration_since(self.started).as_secs_f64().max(1e-3);
        let rate = human_size((self.done as f64 / elapsed) as u64);
        let line = match self.total {
            Some(total) if total > 0 => {
                let fraction = (self.done as f64 / total as f64).min(1.0);
                let filled = (fraction * BAR_WIDTH as f64) as usize;
                format!(
                    "{} [{}{}] {:>3.0}% {} / {}  {rate}/s",
                    self.label,
                    "#".repeat(filled),
                    "-".repeat(BAR_WIDTH - filled),
                    fraction * 100.0,
                    human_size(self.done),
                    human_size(total),
                )
            }
            _ => format!("{} {}  {rate}/s", self.label, human_size(self.done)),
        };
        let mut err = io::stderr().lock();
        let _ = write!(err, "\r{line}\x1b[K");
        let _ = err.flush();
    }
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        self.maybe_draw();
        Ok(n)
    }
}

impl<R> Drop for Progress<R> {
    fn drop(&mut self) {
        if self.last_draw.is_some() {
            let mut err = io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}
