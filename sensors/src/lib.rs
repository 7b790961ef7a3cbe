//! The shared data model of edgewise.
//!
//! `no_std` (with `alloc` for the upstream records) so that firmware, the agent and cloud
//! decoders agree on one definition of every type that crosses a wire.
//!
//! - [`reading`]: channel readings with units and quality flags, the payload of device frames.
//! - [`frame`]: the device frame and its wire codec: postcard, CRC-32C, COBS, 0x00; a
//!   streaming decoder that resynchronises after garbage and never panics.
//! - [`sensor`]: the `Sensor` abstraction; a failed read becomes fault readings.
//! - [`drivers`]: BME280 (temperature, humidity, pressure), ADXL345 (vibration RMS and peak),
//!   INA219 (current, voltage, power), written from the datasheets for embedded-hal 1.0.
//! - `sim` (feature `sim`, needs `std`): the simulated plant: deterministic signals with fault
//!   episodes for the agent's simulated source, and simulated sensors for a firmware simulator.
//! - [`record`]: the upstream batch format (alerts, summaries, gap records) that the agent
//!   sends to cloud backends.
//! - `wire` (feature `codec`, needs `std`): the upstream wire format: JSON or a compact binary
//!   layout, zstd/gzip, and the verifying decoder that backends use.
#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(any(feature = "std", test))]
extern crate std;

pub mod drivers;
pub mod frame;
pub mod reading;
#[cfg(feature = "alloc")]
pub mod record;
pub mod sensor;
#[cfg(feature = "sim")]
pub mod sim;
#[cfg(feature = "codec")]
pub mod wire;
