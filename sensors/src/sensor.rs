//! The Sensor abstraction: one device in, a handful of [`ChannelReading`]s out.
//!
//! # Design
//!
//! A [`Sensor`] is a driver that owns its bus and turns one measurement cycle into readings:
//!
//! ```text
//! init(delay)  ──► read(delay) ──► Readings (≤ MAX_CHANNELS, channel i has unit CHANNELS[i])
//!                       │
//!                       └─ Err(e) ──► read_or_fault ──► one fault reading per channel
//!                                                         (FaultCode from e.fault_code())
//! ```
//!
//! - **Readings by value.** `read` returns a [`Readings`] (a `heapless::Vec` of
//!   [`MAX_CHANNELS`]) rather than pushing into a caller's collection: no allocation, no
//!   generic sink, and the capacity is a compile-time bound that the frame size bound builds on.
//! - **A fixed channel layout.** [`Sensor::CHANNELS`] lists the unit of every channel, numbered
//!   from 0. A successful read returns exactly those channels in that order (quality may vary);
//!   a failed read is turned into a fault reading for each of them, so the cloud sees the same
//!   series either way and a gap in a series means a lost frame, not a broken sensor.
//! - **Faults are readings.** Firmware must not halt on a sensor error: [`read_or_fault`] maps
//!   the driver's error through [`SensorError::fault_code`] to [`FaultCode`]s. The firmware may
//!   still look at the error itself (call [`Sensor::read`] and [`fault_readings`]) to decide
//!   to re-run [`Sensor::init`], e.g. after a brown-out reset the chip's configuration is lost.
//! - **Time through `DelayNs`.** Conversions take milliseconds; the driver waits with the
//!   caller's delay, so the same driver runs on a microcontroller timer, on Linux, or against a
//!   mock in tests.

use embedded_hal::delay::DelayNs;

use crate::reading::{ChannelReading, FaultCode, Unit};

/// The most channels one sensor reports. Four covers temperature + humidity + pressure and
/// current + voltage + power with one spare; a bound keeps `Readings` on the stack.
pub const MAX_CHANNELS: usize = 4;

/// The readings of one measurement cycle of one sensor.
pub type Readings = heapless::Vec<ChannelReading, MAX_CHANNELS>;

/// A driver error that can be reported as a fault reading.
pub trait SensorError {
    /// The fault code that describes this error upstream.
    fn fault_code(&self) -> FaultCode;
}

/// A device that turns into readings.
pub trait Sensor {
    /// What can go wrong talking to the device.
    type Error: SensorError;

    /// The unit of each channel, indexed by channel number (at most [`MAX_CHANNELS`]), for
    /// drivers whose layout is fixed by the chip.
    const CHANNELS: &'static [Unit];

    /// The channel layout of this device. [`Self::CHANNELS`] unless the layout depends on the
    /// instance (a simulated sensor's kind, a configurable ADC): then override this, and
    /// everything that needs the layout ([`read_or_fault`], the firmware) asks here.
    fn channels(&self) -> &'static [Unit] {
        Self::CHANNELS
    }

    /// Checks the device's identity and configures it. Call once before reading, and again
    /// after a fault if the device may have reset.
    fn init(&mut self, delay: &mut impl DelayNs) -> Result<(), Self::Error>;

    /// Runs one measurement cycle and returns one reading per channel of [`Self::CHANNELS`].
    fn read(&mut self, delay: &mut impl DelayNs) -> Result<Readings, Self::Error>;
}

/// One fault reading with `code` for each channel of `channels` (channels past
/// [`MAX_CHANNELS`] are dropped).
pub fn fault_readings(channels: &[Unit], code: FaultCode) -> Readings {
    channels
        .iter()
        .zip(0u8..)
        .take(MAX_CHANNELS)
        .map(|(&unit, channel)| ChannelReading::fault(channel, unit, code))
        .collect()
}

/// Reads `sensor` and never fails: an error becomes one fault reading per channel.
pub fn read_or_fault<S: Sensor>(sensor: &mut S, delay: &mut impl DelayNs) -> Readings {
    match sensor.read(delay) {
        Ok(readings) => readings,
        Err(error) => fault_readings(sensor.channels(), error.fault_code()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::Quality;

    struct Failing;

    struct Broken;

    impl SensorError for Broken {
        fn fault_code(&self) -> FaultCode {
            FaultCode::Timeout
        }
    }

    impl Sensor for Failing {
        type Error = Broken;
        const CHANNELS: &'static [Unit] = &[Unit::Celsius, Unit::PercentRh];

        fn init(&mut self, _delay: &mut impl DelayNs) -> Result<(), Broken> {
            Ok(())
        }

        fn read(&mut self, _delay: &mut impl DelayNs) -> Result<Readings, Broken> {
            Err(Broken)
        }
    }

    struct NoDelay;

    impl DelayNs for NoDelay {
        fn delay_ns(&mut self, _ns: u32) {}
    }

    #[test]
    fn a_failed_read_becomes_one_fault_reading_per_channel() {
        let readings = read_or_fault(&mut Failing, &mut NoDelay);
        assert_eq!(readings.len(), 2);
        assert_eq!(readings[0].channel, 0);
        assert_eq!(readings[0].unit, Unit::Celsius);
        assert_eq!(readings[1].channel, 1);
        assert_eq!(readings[1].unit, Unit::PercentRh);
        for reading in &readings {
            assert_eq!(reading.quality, Quality::Fault(FaultCode::Timeout));
            assert!(reading.value.is_nan());
        }
    }

    #[test]
    fn fault_readings_stop_at_the_capacity() {
        let units = [Unit::Volt; 6];
        assert_eq!(fault_readings(&units, FaultCode::Bus).len(), MAX_CHANNELS);
    }
}
