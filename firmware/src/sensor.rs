//! [`DynSensor`]: the object-safe face of a [`Sensor`], so that one firmware drives sensors of
//! different types through one `&mut [&mut dyn DynSensor]`.
//!
//! [`Sensor`] has an associated error type, an associated const and generic methods (`&mut
//! impl DelayNs`), so `dyn Sensor` does not exist. [`DynSensor`] erases all three: the channel
//! layout becomes a method, the delay becomes `&mut dyn DelayNs` (which itself implements
//! [`DelayNs`], so it can be handed to the generic driver) and the error becomes its
//! [`FaultCode`], which is all the firmware needs to decide what to report and whether to
//! re-initialise. A blanket impl covers every [`Sensor`]; nothing is boxed.

use embedded_hal::delay::DelayNs;
use sensors::reading::{FaultCode, Unit};
use sensors::sensor::{Readings, Sensor, SensorError};

/// A sensor behind a trait object: [`Sensor`] with its error mapped to a [`FaultCode`].
///
/// Implemented for every [`Sensor`]; implement it by hand only for a sensor that is not one
/// (e.g. a test script).
pub trait DynSensor {
    /// The unit of each channel, indexed by channel number (see [`Sensor::channels`]).
    fn channels(&self) -> &'static [Unit];

    /// Checks the device's identity and configures it (see [`Sensor::init`]).
    fn init(&mut self, delay: &mut dyn DelayNs) -> Result<(), FaultCode>;

    /// Runs one measurement cycle (see [`Sensor::read`]).
    fn read(&mut self, delay: &mut dyn DelayNs) -> Result<Readings, FaultCode>;
}

impl<S: Sensor> DynSensor for S {
    fn channels(&self) -> &'static [Unit] {
        Sensor::channels(self)
    }

    fn init(&mut self, mut delay: &mut dyn DelayNs) -> Result<(), FaultCode> {
        Sensor::init(self, &mut delay).map_err(|e| e.fault_code())
    }

    fn read(&mut self, mut delay: &mut dyn DelayNs) -> Result<Readings, FaultCode> {
        Sensor::read(self, &mut delay).map_err(|e| e.fault_code())
    }
}
