//! The shared data model of edgewise.
//!
//! `no_std` (with `alloc` for the upstream records) so that firmware, the agent and cloud
//! decoders agree on one definition of every type that crosses a wire.
//!
//! - [`reading`]: channel readings with units and quality flags, the payload of device frames.
//! - [`record`]: the upstream batch format (alerts, summaries, gap records) that the agent
//!   sends to cloud backends.
//!
//! The device-side frame types (postcard + CRC + COBS) arrive with the device-side issue.
#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod drivers;
pub mod frame;
pub mod reading;
pub mod sensor;
#[cfg(feature = "alloc")]
pub mod record;
