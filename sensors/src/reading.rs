//! Readings: what a sensor measures, in the form every device frame carries.
//!
//! A reading is one value of one channel with its unit and a quality flag. A sensor fault is a
//! reading too (quality [`Quality::Fault`]), so a failing sensor shows up upstream instead of
//! halting the firmware. Enums are append-only: postcard encodes the variant index.

use serde::{Deserialize, Serialize};

/// The physical unit of a reading. Append-only.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    postcard::experimental::max_size::MaxSize,
)]
pub enum Unit {
    /// Degrees Celsius.
    Celsius,
    /// Relative humidity, percent.
    PercentRh,
    /// Pressure, hectopascal.
    Hectopascal,
    /// Vibration velocity RMS, mm/s (ISO 10816 uses this).
    MillimetrePerSecond,
    /// Acceleration, g (standard gravity).
    G,
    /// Electric current, milliampere.
    Milliampere,
    /// Electric potential, volt.
    Volt,
    /// Power, watt.
    Watt,
    /// A dimensionless count or ratio.
    Unitless,
}

impl Unit {
    /// The unit's symbol, as used in series names and logs.
    pub fn symbol(self) -> &'static str {
        match self {
            Unit::Celsius => "degC",
            Unit::PercentRh => "%RH",
            Unit::Hectopascal => "hPa",
            Unit::MillimetrePerSecond => "mm/s",
            Unit::G => "g",
            Unit::Milliampere => "mA",
            Unit::Volt => "V",
            Unit::Watt => "W",
            Unit::Unitless => "1",
        }
    }
}

/// How far a reading can be trusted. Append-only.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    postcard::experimental::max_size::MaxSize,
)]
pub enum Quality {
    /// A normal measurement.
    Good,
    /// Measured, but outside the sensor's specified range or while it settles.
    Uncertain,
    /// The sensor failed; `value` is meaningless and the code says why.
    Fault(FaultCode),
}

/// Why a sensor could not be read. Append-only.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    postcard::experimental::max_size::MaxSize,
)]
pub enum FaultCode {
    /// The bus transaction failed (no ACK, arbitration lost, timeout).
    Bus,
    /// The device answered with an unexpected identity (wrong chip or wiring).
    WrongDevice,
    /// The device answered, but the data is impossible (e.g. all ones).
    InvalidData,
    /// The measurement did not complete in time.
    Timeout,
}

/// One value of one channel.
#[derive(
    Debug, Clone, Copy, PartialEq, Serialize, Deserialize, postcard::experimental::max_size::MaxSize,
)]
pub struct ChannelReading {
    /// The channel on the device (a device numbers its channels from 0).
    pub channel: u8,
    /// The unit of `value`.
    pub unit: Unit,
    /// The measured value (f32: enough for any sensor here, half the bytes of f64).
    pub value: f32,
    /// How far the value can be trusted.
    pub quality: Quality,
}

impl ChannelReading {
    /// A good reading.
    pub fn good(channel: u8, unit: Unit, value: f32) -> ChannelReading {
        ChannelReading { channel, unit, value, quality: Quality::Good }
    }

    /// A fault reading: the sensor could not be read.
    pub fn fault(channel: u8, unit: Unit, code: FaultCode) -> ChannelReading {
        ChannelReading { channel, unit, value: f32::NAN, quality: Quality::Fault(code) }
    }
}
