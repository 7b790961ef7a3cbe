//! Sensor drivers, written from the datasheets.
//!
//! # Why our own drivers
//!
//! The crates.io drivers differ in API shape and error types, some still target embedded-hal
//! 0.2, and none reports faults as readings. The three chips here need a few registers each,
//! so each driver is one file written from its datasheet:
//!
//! | driver | chip | bus | channels |
//! |---|---|---|---|
//! | [`bme280::Bme280`] | Bosch BME280 | I2C 0x76/0x77 | °C, %RH, hPa |
//! | [`adxl345::Adxl345`] | ADI ADXL345 | I2C 0x53/0x1D | vibration RMS g, peak g |
//! | [`ina219::Ina219`] | TI INA219 | I2C 0x40–0x4F | mA, V, W |
//!
//! # Conventions (eldruin's embedded-hal drivers)
//!
//! - `new(i2c, address, ..)` only stores; it does no I/O. [`Sensor::init`] checks the identity
//!   and configures the chip; [`Sensor::read`] runs one measurement cycle.
//! - `release(self)` gives the bus back.
//! - Register addresses and bit fields are named consts at the top of each file.
//! - One hand-written [`Error`] generic over the bus error, shared by all drivers; it maps to a
//!   [`FaultCode`] through [`SensorError`], so the firmware reports rather than halts.
//! - No panics on any bus data: the compensation arithmetic wraps where the datasheet's C code
//!   would overflow, and impossible raw values become [`Error::InvalidData`].
//!
//! [`Sensor::init`]: crate::sensor::Sensor::init
//! [`Sensor::read`]: crate::sensor::Sensor::read

pub mod adxl345;
pub mod bme280;
pub mod ina219;

use crate::reading::FaultCode;
use crate::sensor::SensorError;

/// What can go wrong with a driver, generic over the bus error `E`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error<E> {
    /// The bus transaction failed.
    Bus(E),
    /// The device's identity register did not hold the expected value (wrong chip, wrong
    /// address or wiring). `id` is what was read (for the INA219, which has no ID register,
    /// the configuration register right after a reset).
    WrongDevice {
        /// The identity that was read.
        id: u16,
    },
    /// The device answered with data it cannot produce (e.g. the reset value of a data
    /// register, or calibration that makes the formula divide by zero).
    InvalidData,
    /// The device did not finish (a reset or conversion) in the time the datasheet gives.
    Timeout,
    /// The driver's configuration cannot be programmed into the chip.
    InvalidConfig,
}

impl<E> From<E> for Error<E> {
    fn from(error: E) -> Self {
        Error::Bus(error)
    }
}

impl<E> SensorError for Error<E> {
    fn fault_code(&self) -> FaultCode {
        match self {
            Error::Bus(_) => FaultCode::Bus,
            Error::WrongDevice { .. } => FaultCode::WrongDevice,
            Error::InvalidData | Error::InvalidConfig => FaultCode::InvalidData,
            Error::Timeout => FaultCode::Timeout,
        }
    }
}

impl<E: core::fmt::Debug> core::fmt::Display for Error<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Bus(e) => write!(f, "bus error: {e:?}"),
            Error::WrongDevice { id } => write!(f, "unexpected device identity {id:#06x}"),
            Error::InvalidData => f.write_str("the device returned impossible data"),
            Error::Timeout => f.write_str("the device did not finish in time"),
            Error::InvalidConfig => f.write_str("the configuration cannot be programmed"),
        }
    }
}

impl<E: core::fmt::Debug> core::error::Error for Error<E> {}
