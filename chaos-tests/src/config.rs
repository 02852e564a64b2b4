//! Configuration writes during the faults: `PUT /api/v1/config/pricing` with a price that
//! changes with every write, through random nodes, retried while the cluster cannot take it
//! (503, no answer). Every write is recorded with the version it got, or as possibly applied when
//! an attempt's outcome is unknown (such a write may still be committed later).

use crate::cluster::Target;
use crate::ledger::AttemptClass;
use serde::Serialize;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tollgate_rules::fleet::Xorshift;
use tracing::{debug, info, warn};

/// The model whose price changes.
pub const MODEL: &str = "chaos-model";

/// One pricing write.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigWrite {
    /// Sequence number (the price is derived from it).
    pub seq: u64,
    /// The input price it sets.
    pub price: f64,
    /// The version it was acknowledged with.
    pub version: Option<u64>,
    /// The node that acknowledged it.
    pub acked_by: Option<String>,
    /// Some attempt may have been committed without an answer (timeout, 503, lost connection):
    /// the write may take effect later than its acknowledgement, or without one.
    pub maybe_applied: bool,
    /// Failed attempts: (node, class, error).
    pub failures: Vec<(String, AttemptClass, String)>,
}

/// The input price of write `seq` (exact in binary and in the API's 6 decimals).
pub fn price(seq: u64) -> f64 {
    1.0 + seq as f64 * 0.25
}

/// The pricing document of write `seq` (YAML, SkyWalking's gen-ai-config format).
pub fn document(seq: u64) -> String {
    format!(
        "last-updated: chaos-{seq}\nproviders:\n  - provider: chaos\n    models:\n      - name: {MODEL}\n        input-estimated-cost-per-m: {}\n        output-estimated-cost-per-m: 2\n",
        price(seq)
    )
}

/// The input price of a pricing document as `GET /api/v1/config/pricing` returns it.
pub fn price_of(document: &Value) -> Option<f64> {
    document["providers"]
        .as_array()?
        .iter()
        .flat_map(|p| p["models"].as_array().cloned().unwrap_or_default())
        .find(|m| m["name"] == MODEL)?["input-estimated-cost-per-m"]
        .as_f64()
}

/// One attempt of a `PUT`: the version, or how it failed.
pub async fn put_pricing(http: &reqwest::Client, api: &str, document: &str) -> Result<u64, (AttemptClass, String)> {
    let response = http.put(format!("{api}/api/v1/config/pricing")).body(document.to_string()).send().await;
    let response = match response {
        Ok(response) => response,
        Err(error) if error.is_connect() => return Err((AttemptClass::Unreachable, error.to_string())),
        Err(error) => return Err((AttemptClass::Unknown, format!("{error:?}"))),
    };
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    match status {
        200 => serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["version"].as_u64())
            .ok_or_else(|| (AttemptClass::Unexpected, format!("200 without a version: {body}"))),
        503 | 429 => Err((AttemptClass::Refused, format!("{status} {body}"))),
        _ => Err((AttemptClass::Unexpected, format!("{status} {body}"))),
    }
}

/// Writes until `stop`, one write every 1-4 s.
pub async fn run(
    targets: watch::Receiver<Vec<Target>>,
    mut stop: watch::Receiver<bool>,
    writes: Arc<Mutex<Vec<ConfigWrite>>>,
    give_up: Duration,
    seed: u64,
) {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(8)).build().expect("http client");
    let mut rng = Xorshift::new(seed);
    let mut seq = 0;
    loop {
        let pause = Duration::from_millis(1000 + rng.below(3000));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        if *stop.borrow() {
            break;
        }
        seq += 1;
        let write = write(&http, &mut rng, &targets, seq, give_up).await;
        writes.lock().expect("writes").push(write);
    }
    info!(writes = seq, "config writer stopped");
}

/// Writes pricing document `seq` until acknowledged or given up.
pub async fn write(
    http: &reqwest::Client,
    rng: &mut Xorshift,
    targets: &watch::Receiver<Vec<Target>>,
    seq: u64,
    give_up: Duration,
) -> ConfigWrite {
    let started = Instant::now();
    let document = document(seq);
    let mut write = ConfigWrite {
        seq,
        price: price(seq),
        version: None,
        acked_by: None,
        maybe_applied: false,
        failures: Vec::new(),
    };
    loop {
        let target = {
            let targets = targets.borrow();
            targets[rng.below(targets.len() as u64) as usize].clone()
        };
        match put_pricing(http, &target.api, &document).await {
            Ok(version) => {
                info!(seq, price = write.price, version, node = %target.name,
                    attempts = write.failures.len() + 1, "pricing write acknowledged");
                write.version = Some(version);
                write.acked_by = Some(target.name);
                return write;
            }
            Err((class, error)) => {
                debug!(seq, node = %target.name, class = class.name(), %error, "pricing write attempt failed");
                if class == AttemptClass::Unexpected {
                    warn!(seq, node = %target.name, %error, "unexpected answer to a pricing write");
                }
                if class != AttemptClass::Unreachable {
                    write.maybe_applied = true;
                }
                write.failures.push((target.name, class, error));
                if started.elapsed() >= give_up {
                    warn!(seq, attempts = write.failures.len(), "pricing write given up: its outcome is unknown");
                    return write;
                }
                tokio::time::sleep(Duration::from_millis(200 + rng.below(300))).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_price_round_trips_through_the_document() {
        for seq in [0, 1, 7, 1234] {
            let yaml = document(seq);
            assert!(yaml.contains(&format!("input-estimated-cost-per-m: {}", price(seq))), "{yaml}");
            let json = serde_json::json!({"providers": [{"provider": "chaos", "models": [
                {"name": MODEL, "input-estimated-cost-per-m": price(seq)}]}]});
            assert_eq!(price_of(&json), Some(price(seq)));
        }
    }
}
