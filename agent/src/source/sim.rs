//! The simulated source: pumps with plausible signals and injected faults, for demos and
//! tests that need no hardware and no broker.
//!
//! The signal model lives in [`sensors::sim`] (shared with the firmware simulator): its
//! module docs give every signal shape, the fault episodes and the random fault schedule.
//! This module maps a `kind = "simulated"` source onto it: devices `pump-1` ... `pump-N`, each
//! configured metric becomes the series `<device>/<metric>`, and the task steps the model
//! once per interval with the gateway clock.

use sensors::sim::{SimConfig, Simulator};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{SourceError, send_or_cancel};
use crate::config::SimulatedSourceConfig;
use crate::event::{Event, Ingest, now_ms};

/// The signal model of a simulated source: [`sensors::sim::Simulator`] with the source's
/// devices (`pump-1` ... `pump-N`), metrics, seed and fault switch.
pub fn simulator(cfg: &SimulatedSourceConfig) -> Simulator {
    Simulator::new(&SimConfig {
        seed: cfg.seed,
        devices: (1..=cfg.devices).map(|n| format!("pump-{n}")).collect(),
        metrics: cfg.metrics.clone(),
        faults: cfg.faults,
    })
}

/// Runs a simulated source until `cancel`: one reading per series every `cfg.interval`,
/// stamped with the gateway clock, without acks.
pub(crate) async fn run(
    index: u16,
    cfg: &SimulatedSourceConfig,
    ingest: mpsc::Sender<Ingest>,
    cancel: CancellationToken,
) -> Result<(), SourceError> {
    if cfg.interval.is_zero() {
        return Err(SourceError::InvalidConfig {
            name: cfg.name.clone(),
            reason: "`interval` must be longer than 0 s".into(),
        });
    }
    let mut simulator = simulator(cfg);
    let mut ticker = tokio::time::interval(cfg.interval);
    // After backpressure, carry on at the normal pace instead of bursting to catch up.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(
        source = %cfg.name,
        devices = cfg.devices,
        metrics = ?cfg.metrics,
        interval = ?cfg.interval,
        faults = cfg.faults,
        "simulated source started"
    );
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let now = now_ms();
        for reading in simulator.step(now) {
            let event = Event {
                series: reading.series,
                ts_ms: now,
                value: reading.value,
                received_ms: now,
                source: index,
            };
            let message = Ingest { event: Some(event), ack: None, redelivery: None };
            if !send_or_cancel(&ingest, message, &cancel, &cfg.name).await? {
                tracing::info!(source = %cfg.name, "simulated source stopped");
                return Ok(());
            }
        }
    }
    tracing::info!(source = %cfg.name, "simulated source stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{self, SourceConfig};
    use sensors::sim::FaultKind;

    const START_MS: i64 = 1_700_000_000_000;

    fn config(seed: u64, faults: bool, metrics: &[&str]) -> SimulatedSourceConfig {
        SimulatedSourceConfig {
            name: "sim".into(),
            devices: 3,
            metrics: metrics.iter().map(|m| m.to_string()).collect(),
            interval: Duration::from_secs(1),
            faults,
            seed,
        }
    }

    #[test]
    fn the_config_maps_to_pumps_metrics_seed_and_faults() {
        let cfg = config(7, false, &["temperature", "flow"]);
        let mut sim = simulator(&cfg);
        let names: Vec<String> = sim.step(START_MS).into_iter().map(|r| r.series).collect();
        assert_eq!(
            names,
            [
                "pump-1/temperature",
                "pump-1/flow",
                "pump-2/temperature",
                "pump-2/flow",
                "pump-3/temperature",
                "pump-3/flow"
            ]
        );
        // Faults off: an hour without a dropout, a stuck value or a spike.
        let mut sim = simulator(&cfg);
        for s in 0..3_600 {
            let readings = sim.step(START_MS + s * 1000);
            assert_eq!(readings.len(), 6);
            assert!(readings.iter().all(|r| r.fault.is_none()), "second {s}");
        }
    }

    #[test]
    fn an_injected_fault_reaches_the_source_readings() {
        let mut sim = simulator(&config(1, false, &["temperature"]));
        sim.inject(1, 0, FaultKind::Dropout, START_MS, 5_000);
        let readings = sim.step(START_MS);
        assert!(readings.iter().all(|r| !r.series.starts_with("pump-2/")), "{readings:?}");
    }

    /// The demo's `bearing-overheat` rule (above 80 °C for 2 s) must fire within a minute of
    /// `edgewise run` without a config: the demo config's source, stepped at its interval,
    /// holds a temperature above 80 °C for well over 2 s within the first 60 s.
    #[test]
    fn the_demo_config_overheats_a_bearing_within_the_first_minute() {
        let demo = config::load_str("demo.toml", include_str!("../../../config/demo.toml"))
            .map_err(|e| e.to_string())
            .unwrap();
        let cfg = demo
            .sources
            .iter()
            .find_map(|s| match s {
                SourceConfig::Simulated(c) => Some(c.clone()),
                _ => None,
            })
            .expect("the demo has a simulated source");
        let interval_ms = i64::try_from(cfg.interval.as_millis()).unwrap();
        let mut sim = simulator(&cfg);
        let mut above_since: std::collections::HashMap<String, i64> = Default::default();
        let mut longest_ms = 0;
        let mut now = START_MS;
        while now < START_MS + 60_000 {
            for r in sim.step(now).into_iter().filter(|r| r.series.ends_with("/temperature")) {
                if r.value > 80.0 {
                    let since = *above_since.entry(r.series).or_insert(now);
                    longest_ms = longest_ms.max(now - since);
                } else {
                    above_since.remove(&r.series);
                }
            }
            now += interval_ms;
        }
        assert!(longest_ms >= 12_000, "longest run above 80 °C: {longest_ms} ms");
    }

    #[tokio::test]
    async fn the_task_sends_events_without_acks_and_stops_on_cancel() {
        let mut cfg = config(1, true, &["temperature"]);
        cfg.interval = Duration::from_millis(10);
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { run(4, &cfg, tx, cancel).await }
        });
        let deadline = Duration::from_secs(5);
        for _ in 0..6 {
            let ingest = tokio::time::timeout(deadline, rx.recv()).await.unwrap().unwrap();
            let event = ingest.event.unwrap();
            assert!(ingest.ack.is_none() && ingest.redelivery.is_none());
            assert_eq!(event.source, 4);
            assert_eq!(event.ts_ms, event.received_ms);
            assert!(event.series.starts_with("pump-") && event.series.ends_with("/temperature"));
        }
        cancel.cancel();
        let result = tokio::time::timeout(deadline, task).await.unwrap().unwrap();
        assert!(result.is_ok());
    }

    #[tokio::test]
    async fn a_zero_interval_is_rejected() {
        let mut cfg = config(1, true, &["temperature"]);
        cfg.interval = Duration::ZERO;
        let (tx, _rx) = mpsc::channel(1);
        let result = run(0, &cfg, tx, CancellationToken::new()).await;
        assert!(matches!(result, Err(SourceError::InvalidConfig { .. })));
    }
}
