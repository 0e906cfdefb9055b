//! What blockctl prints: results as text or JSON on stdout, failures on stderr (and as JSON
//! on stdout with `--json`), and the exit status that goes with them.

use crate::cli::{EXIT_FAILED, EXIT_USAGE};
use qapi::error::QmpError;
use serde_json::{json, Value};
use std::fmt::Display;

/// Why a command did not do what was asked.
#[derive(Debug)]
pub struct Failure {
    /// What failed, with the daemon's own words after a colon.
    pub message: String,
    /// The QMP error class, when the daemon refused.
    pub class: Option<String>,
    /// The exit status.
    pub code: i32,
}

impl Failure {
    /// A failure of blockctl's own.
    pub fn new(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            class: None,
            code: EXIT_FAILED,
        }
    }

    /// Arguments that cannot work, found after clap's own checks.
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_USAGE,
            ..Failure::new(message)
        }
    }

    /// The daemon refused `what`.
    pub fn refused(what: impl Display, error: QmpError) -> Failure {
        Failure {
            message: format!("{what}: {}", error.desc),
            class: Some(error.class.as_str().to_owned()),
            code: EXIT_FAILED,
        }
    }

    /// Prints the failure and returns its exit status.
    pub fn report(self, json: bool) -> i32 {
        eprintln!("blockctl: {}", self.message);
        if json {
            let class = self.class.as_deref().unwrap_or("blockctl");
            println!(
                "{}",
                json!({"error": {"class": class, "desc": self.message}})
            );
        }
        self.code
    }
}

/// A closure that turns a QMP error into a [`Failure`] saying what was being done.
pub fn refused<D: Display>(what: D) -> impl FnOnce(QmpError) -> Failure {
    move |error| Failure::refused(what, error)
}

/// Prints `value` as one line of JSON.
pub fn print_json(value: &Value) {
    println!("{value}");
}

/// Prints rows under a header, each column as wide as its widest cell.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        println!("{}", text.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Bytes as a person reads them: 1.50 GiB.
pub fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// A bitmap's state in words: recording or disabled, then persistent, busy, INCONSISTENT.
pub fn bitmap_flags(bitmap: &qmp::api::DirtyBitmapInfo) -> Vec<&'static str> {
    let mut flags = vec![if bitmap.recording {
        "recording"
    } else {
        "disabled"
    }];
    for (set, word) in [
        (bitmap.persistent, "persistent"),
        (bitmap.busy, "busy"),
        (bitmap.inconsistent, "INCONSISTENT"),
    ] {
        if set {
            flags.push(word);
        }
    }
    flags
}

/// blockd's estimates for a mirror or active commit in words (`copying 1.00 GiB/s, clients
/// dirty 2.00 MiB/s, ready in ~4 s`); None when the daemon gives none (qsd, other jobs).
pub fn estimates(job: &qmp::api::BlockJobInfo) -> Option<String> {
    let copy = job.copy_rate?;
    let mut text = format!(
        "copying {}/s, clients dirty {}/s",
        bytes(copy),
        bytes(job.dirty_rate.unwrap_or(0))
    );
    if !job.ready {
        match job.seconds_to_ready {
            Some(s) => text.push_str(&format!(", ready in ~{s:.0} s")),
            None => text.push_str(", not converging"),
        }
    }
    Some(text)
}
