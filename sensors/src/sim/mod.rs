//! The simulated plant: deterministic signals with fault episodes, and simulated sensors.
//!
//! One signal model serves two callers:
//!
//! ```text
//!                    ┌──────────────────────────────┐
//! agent (simulated   │ Simulator: devices × metrics │  step(now_ms) ──► Vec<SimReading>
//! source) ─────────► │ Shape per metric, episodes,  │
//!                    │ seeded fastrand::Rng         │
//!                    └──────────────▲───────────────┘
//!                                   │ one device, a fixed set of metrics
//! firmware simulator ──► SimulatedSensor (impl Sensor) ──read()──► Readings in chip units
//!        │                          ▲
//!        └── SimClock (shared ms) ──┘   the caller sets the time; the sensor reads it
//! ```
//!
//! # Determinism
//!
//! [`Simulator`] is a pure state machine: `step(now_ms)` returns the readings for that instant
//! and the only randomness is a `fastrand::Rng` seeded by the caller, so the same seed and the
//! same sequence of `now_ms` give the same readings. Explicit injections ([`Simulator::inject`],
//! [`SimulatedSensor::inject`]) draw nothing from the generator: a simulator with a fault
//! injected and a twin without it produce the same noise, so the difference between the two is
//! exactly the fault. Faults are scheduled in time rather than per sample, so they look the
//! same at any sampling interval.
//!
//! # Signals
//!
//! Every device has its own phases: a daily cycle (−1..1, a sine over 24 h of `now_ms`, i.e.
//! UTC days) and a load cycle (0..1, a sine with a period of 20–40 min). Each metric name
//! selects a [`Shape`]; the value is `level(daily, load) + σ · noise` (standard normal noise),
//! held within the shape's physical bounds. The agent's pump metrics:
//!
//! | metric        | shape                                                                 |
//! |---------------|-----------------------------------------------------------------------|
//! | `temperature` | 45 °C + 3 °C daily sine + ±2.5 °C slow load cycle + noise (σ 0.3)    |
//! | `vibration`   | 2 mm/s RMS + ±0.4 with load + noise (σ 0.12), never below 0.05        |
//! | `pressure`    | 4 bar + ±0.2 with load + noise (σ 0.03)                               |
//! | `current`     | 12 A + ±3 A with load + noise (σ 0.2)                                 |
//! | `humidity`    | 45 % − 10 % daily sine + noise (σ 0.8), within 0..100                 |
//! | other         | 50 + 10 daily sine + noise (σ 1)                                      |
//!
//! and the shapes behind the simulated sensors, in the units of the chips they imitate:
//!
//! | metric                | shape                                                         |
//! |-----------------------|---------------------------------------------------------------|
//! | `ambient_temperature` | 22 °C + 3 °C daily sine + noise (σ 0.05)                      |
//! | `air_pressure`        | 1013.25 hPa + 1.5 hPa daily sine + noise (σ 0.02)             |
//! | `vibration_rms`       | 0.2 g + ±0.07 g with load + noise (σ 0.005), never below 0.02 |
//! | `crest_factor`        | 2 + ±0.2 with load + noise (σ 0.05), never below 1            |
//! | `load_current`        | 800 mA + ±200 mA with load + noise (σ 5), never below 0       |
//! | `bus_voltage`         | 12 V − ±0.1 V with load (the supply sags) + noise (σ 0.01)    |
//!
//! # Faults
//!
//! [`FaultKind`] names the six kinds; each is an *episode* on one series, except a dropout,
//! which silences a whole device:
//!
//! - *excursion*: the value ramps to the shape's peak in 5 s, holds, ramps back at the end
//!   (temperature: 84–90 °C, an overheating bearing);
//! - *spike*: a single sample off by about the shape's spike size;
//! - *drift*: an offset growing linearly to the shape's drift total over the episode (bearing
//!   wear raises the vibration past 7 mm/s, a clogging filter lowers the pressure), then it
//!   snaps back (recalibrated);
//! - *stuck*: the series repeats its last value;
//! - *dropout*: the device sends nothing;
//! - *noise burst*: the noise is amplified [`NOISE_BURST_GAIN`] times (EMI, a loose
//!   connector).
//!
//! With random faults on, the first episode starts 20–40 s after the first step and is an
//! excursion on the first metric that overheats or overloads (`temperature`,
//! `ambient_temperature`, `vibration_rms`, `load_current`), so the agent's demo raises its
//! threshold alert within a minute; then one episode every 1–3 minutes on a random device:
//!
//! - excursion (40 %): lasts 25–40 s; for `temperature` above 80 °C for roughly 15–30 s;
//! - drift (25 %): 2–5 minutes;
//! - stuck (12 %): 30–90 s;
//! - noise burst (8 %): 30–90 s;
//! - dropout (15 %): 20–60 s.
//!
//! A device without such a metric gets a drift instead of an excursion. Independently, each
//! series has a single-sample spike about once per 10 minutes (80 % of them upwards); spikes
//! are what `for` durations and hysteresis in rules are meant to ignore.
//!
//! # Simulated sensors
//!
//! [`SimulatedSensor`] implements [`Sensor`](crate::sensor::Sensor) on top of a one-device
//! [`Simulator`]; see [`SimKind`] for the channels. It reads the time from a [`SimClock`] the
//! caller advances, so a firmware simulator or a test controls time completely.

mod model;
mod sensor;

use core::fmt;
use std::string::String;

pub use model::{FaultKind, NOISE_BURST_GAIN, Shape, SimConfig, SimReading, Simulator};
pub use sensor::{SimClock, SimError, SimKind, SimulatedSensor};

/// A name that does not parse as a [`FaultKind`] or a [`SimKind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownName {
    /// What was being parsed ("fault kind", "simulated sensor kind").
    what: &'static str,
    /// The name given.
    name: String,
    /// The valid names.
    valid: &'static [&'static str],
}

impl UnknownName {
    fn new(what: &'static str, name: &str, valid: &'static [&'static str]) -> UnknownName {
        UnknownName { what, name: name.into(), valid }
    }

    /// The name that was not recognised.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The names that would have been accepted.
    pub fn valid(&self) -> &'static [&'static str] {
        self.valid
    }
}

impl fmt::Display for UnknownName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown {} `{}`; expected one of: ", self.what, self.name)?;
        for (i, valid) in self.valid.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(valid)?;
        }
        Ok(())
    }
}

impl std::error::Error for UnknownName {}
