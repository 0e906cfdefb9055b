//! `blockctl watch`: every event as it arrives on stdout (one line of text, or the event's
//! JSON), with a progress bar per running job drawn on stderr when both are a terminal.
//! Connection news goes to stderr, so that `--json` output stays pure JSON.

use crate::output::{estimates, refused, Failure};
use crate::progress::Bars;
use qmp::api::{Event, JobStatus, QueryBlockJobs, QueryJobs};
use qmp::Client;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::io::IsTerminal;
use std::time::Duration;
use tokio::time::Instant;

/// How often the bars are brought up to date.
const TICK: Duration = Duration::from_millis(200);

/// How long one reconnection attempt waits for the monitor before saying so again.
const PATIENCE: Duration = Duration::from_secs(60);

/// Follows events until the connection ends (or forever, with `reconnect`).
pub async fn watch(client: &mut Client, json: bool, reconnect: bool) -> Result<i32, Failure> {
    let mut bars = if !json && std::io::stdout().is_terminal() {
        Bars::new()
    } else {
        Bars::hidden()
    };
    loop {
        match follow(client, json, &mut bars).await {
            Ok(never) => match never {},
            Err(e) if reconnect => {
                bars.note(&format!("connection lost ({e}); waiting for the daemon"));
                while let Err(e) = client.reconnect(PATIENCE).await {
                    bars.note(&format!("still waiting for {} ({e})", client.address()));
                }
                bars.note("connected again");
            }
            Err(e) => return Err(Failure::new(format!("connection to the daemon lost: {e}"))),
        }
    }
}

/// Shows events and bars until the connection fails.
async fn follow(client: &mut Client, json: bool, bars: &mut Bars) -> Result<Infallible, String> {
    loop {
        let jobs = client
            .call(&QueryJobs {})
            .await
            .map_err(|e| refused("query-jobs")(e).message)?;
        let block_jobs = client
            .call(&QueryBlockJobs {})
            .await
            .map_err(|e| refused("query-block-jobs")(e).message)?;
        for message in client.drain_events() {
            print_event(&message, json, bars);
        }
        // A job's end is told by its events; its bar goes, so bars never pile up.
        for job in &jobs {
            if job.status == JobStatus::Concluded {
                bars.remove(&job.id);
            } else {
                let detail = block_jobs
                    .iter()
                    .find(|b| b.device == job.id)
                    .and_then(estimates);
                bars.update(job, detail);
            }
        }
        for id in bars.ids() {
            if !jobs.iter().any(|j| j.id == id) {
                bars.remove(&id);
            }
        }
        let tick = Instant::now() + TICK;
        loop {
            let wait = tick.saturating_duration_since(Instant::now());
            match client.next_typed_event(wait).await {
                Ok(Some(event)) => print_event(&to_message(&event), json, bars),
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

fn to_message(event: &Event) -> Value {
    json!({
        "event": event.name,
        "data": event.data,
        "timestamp": {
            "seconds": event.timestamp_us / 1_000_000,
            "microseconds": event.timestamp_us % 1_000_000,
        },
    })
}

fn print_event(message: &Value, json: bool, bars: &Bars) {
    if json {
        bars.print(&message.to_string());
        return;
    }
    let Some(event) = Event::from_message(message) else {
        return;
    };
    let seconds = event.timestamp_us / 1_000_000;
    let millis = (event.timestamp_us % 1_000_000) / 1000;
    let day = seconds % 86_400;
    let mut text = format!(
        "{:02}:{:02}:{:02}.{millis:03} {}",
        day / 3600,
        day / 60 % 60,
        day % 60,
        event.name
    );
    if let Value::Object(data) = &event.data {
        for (key, value) in data {
            match value {
                Value::String(s) => text.push_str(&format!(" {key}={s}")),
                other => text.push_str(&format!(" {key}={other}")),
            }
        }
    }
    bars.print(&text);
}
