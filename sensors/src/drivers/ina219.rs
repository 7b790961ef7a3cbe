//! Texas Instruments INA219: current, bus voltage and power over I2C.
//!
//! # Operation (datasheet SBOS448G)
//!
//! ```text
//! init:  write 0x00 = 0x8000 (configuration: RST, same as power-on reset)
//!        read  0x00 == 0x399F (the reset value: the INA219 has no ID register)
//!        write 0x00 = config (32 V bus range, PGA from the shunt, 12-bit, continuous)
//!        write 0x05 = calibration
//!        wait 1.1 ms (one shunt + one bus conversion at 12 bit: 2 × 532 µs)
//! read:  read 0x02 (bus voltage: bits 15..3 × 4 mV, bit 1 CNVR, bit 0 OVF)
//!        read 0x04 (current, signed, × current LSB)
//!        read 0x03 (power, × 20 current LSB; reading it clears CNVR)
//! ```
//!
//! Registers are 16-bit big-endian.
//!
//! # Calibration (datasheet §8.5.1)
//!
//! ```text
//! Current_LSB = Max_Expected_Current / 2^15
//! Cal         = trunc(0.04096 / (Current_LSB × R_shunt))
//! Power_LSB   = 20 × Current_LSB
//! ```
//!
//! With the current in mA and the shunt in mΩ this is, exactly in integers,
//! `Cal = 1_342_177_280 / (max_mA × shunt_mΩ)`; bit 0 of the register is void, so Cal is made
//! even. The LSBs used for conversion are then derived back from the programmed Cal
//! (`Current_LSB = 0.04096 / (Cal × R_shunt)`), so the readings match what the chip computes.
//! The PGA range is the smallest of ±40/80/160/320 mV that holds `max × R_shunt`.
//!
//! The OVF flag means the current or power computation overflowed: those two readings are
//! [`Quality::Uncertain`]; the bus voltage stays good. After a brown-out the chip's calibration
//! is 0 and current and power read 0; the firmware re-runs [`Sensor::init`] after faults.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

use super::Error;
use crate::reading::{ChannelReading, Quality, Unit};
use crate::sensor::{Readings, Sensor};

/// The address with A0 and A1 to GND (the chip has 16: 0x40..=0x4F).
pub const ADDRESS_DEFAULT: u8 = 0x40;

const REG_CONFIG: u8 = 0x00;
const REG_BUS_VOLTAGE: u8 = 0x02;
const REG_POWER: u8 = 0x03;
const REG_CURRENT: u8 = 0x04;
const REG_CALIBRATION: u8 = 0x05;

const CONFIG_RESET: u16 = 0x8000;
/// The configuration register after a reset.
const CONFIG_DEFAULT: u16 = 0x399F;
/// BRNG = 1: 32 V bus range.
const CONFIG_BRNG_32V: u16 = 1 << 13;
/// PG field (bits 12..11).
const CONFIG_PG_SHIFT: u16 = 11;
/// BADC = 0011: 12-bit bus conversion, 532 µs.
const CONFIG_BADC_12BIT: u16 = 0b0011 << 7;
/// SADC = 0011: 12-bit shunt conversion, 532 µs.
const CONFIG_SADC_12BIT: u16 = 0b0011 << 3;
/// MODE = 111: shunt and bus, continuous.
const CONFIG_MODE_CONTINUOUS: u16 = 0b111;
/// One shunt and one bus conversion at 12 bit (2 × 532 µs), rounded up.
const CONVERSION_US: u32 = 1_100;

const BUS_OVF: u16 = 1 << 0;
/// Bus voltage LSB: 4 mV (an integer, so that whole millivolts convert exactly).
const BUS_LSB_MV: u16 = 4;
/// 0.04096 × 2^15 × 10^6: the datasheet's calibration constant with mA and mΩ.
const CAL_NUMERATOR: u64 = 1_342_177_280;
/// PGA full scales in µV (/1, /2, /4, /8).
const PGA_FULL_SCALE_UV: [u64; 4] = [40_000, 80_000, 160_000, 320_000];

/// The shunt and the current it is sized for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shunt {
    /// The shunt resistance, mΩ (e.g. 100 on the common breakout boards).
    pub resistance_milliohm: u32,
    /// The largest current expected, mA; sets the resolution (max / 2^15).
    pub max_current_ma: u32,
}

/// The register values and LSBs derived from a [`Shunt`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// The configuration register.
    pub config: u16,
    /// The calibration register.
    pub calibration: u16,
    /// mA per current-register count.
    pub current_lsb_ma: f32,
    /// W per power-register count.
    pub power_lsb_w: f32,
}

impl Calibration {
    /// Computes the calibration as datasheet §8.5.1 describes; `None` if the shunt voltage at
    /// the maximum current exceeds ±320 mV or the calibration does not fit the register.
    pub fn new(shunt: Shunt) -> Option<Calibration> {
        let r = u64::from(shunt.resistance_milliohm);
        // 1 mA × 1 mΩ = 1 µV.
        let full_scale_uv = u64::from(shunt.max_current_ma) * r;
        if full_scale_uv == 0 {
            return None;
        }
        let pg = PGA_FULL_SCALE_UV.iter().position(|&fs| full_scale_uv <= fs)? as u16;
        let cal = (CAL_NUMERATOR / full_scale_uv) & !1;
        let calibration = u16::try_from(cal).ok().filter(|&c| c != 0)?;
        // Current_LSB = 0.04096 / (Cal × R) A = 40960 / (Cal × R_mΩ) mA.
        let current_lsb_ma = (40_960.0 / (f64::from(calibration) * r as f64)) as f32;
        Some(Calibration {
            config: CONFIG_BRNG_32V
                | (pg << CONFIG_PG_SHIFT)
                | CONFIG_BADC_12BIT
                | CONFIG_SADC_12BIT
                | CONFIG_MODE_CONTINUOUS,
            calibration,
            current_lsb_ma,
            power_lsb_w: current_lsb_ma * 20.0 / 1000.0,
        })
    }
}

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Current through the shunt, mA (negative: reverse).
    pub current_ma: f32,
    /// Voltage on IN− to ground, V.
    pub bus_v: f32,
    /// Power, W.
    pub power_w: f32,
    /// The current or power computation overflowed (OVF).
    pub overflow: bool,
}

/// An INA219 on an I2C bus.
#[derive(Debug)]
pub struct Ina219<I2C> {
    i2c: I2C,
    address: u8,
    shunt: Shunt,
}

impl<I2C: I2c> Ina219<I2C> {
    /// A driver for the chip at `address` measuring through `shunt`. No I/O until
    /// [`Sensor::init`], which refuses a shunt that [`Calibration::new`] cannot program.
    pub fn new(i2c: I2C, address: u8, shunt: Shunt) -> Self {
        Ina219 { i2c, address, shunt }
    }

    /// Gives the bus back.
    pub fn release(self) -> I2C {
        self.i2c
    }

    /// Reads bus voltage, current and power.
    pub fn measure(&mut self) -> Result<Measurement, Error<I2C::Error>> {
        let cal = Calibration::new(self.shunt).ok_or(Error::InvalidConfig)?;
        let bus = self.read_register(REG_BUS_VOLTAGE)?;
        let current = self.read_register(REG_CURRENT)? as i16;
        let power = self.read_register(REG_POWER)?;
        Ok(Measurement {
            current_ma: f32::from(current) * cal.current_lsb_ma,
            bus_v: f32::from((bus >> 3) * BUS_LSB_MV) / 1000.0,
            power_w: f32::from(power) * cal.power_lsb_w,
            overflow: bus & BUS_OVF != 0,
        })
    }

    fn read_register(&mut self, register: u8) -> Result<u16, Error<I2C::Error>> {
        let mut value = [0u8; 2];
        self.i2c.write_read(self.address, &[register], &mut value)?;
        Ok(u16::from_be_bytes(value))
    }

    fn write_register(&mut self, register: u8, value: u16) -> Result<(), Error<I2C::Error>> {
        let [hi, lo] = value.to_be_bytes();
        self.i2c.write(self.address, &[register, hi, lo])?;
        Ok(())
    }
}

impl<I2C: I2c> Sensor for Ina219<I2C> {
    type Error = Error<I2C::Error>;
    const CHANNELS: &'static [Unit] = &[Unit::Milliampere, Unit::Volt, Unit::Watt];

    fn init(&mut self, delay: &mut impl DelayNs) -> Result<(), Self::Error> {
        let cal = Calibration::new(self.shunt).ok_or(Error::InvalidConfig)?;
        self.write_register(REG_CONFIG, CONFIG_RESET)?;
        let id = self.read_register(REG_CONFIG)?;
        if id != CONFIG_DEFAULT {
            return Err(Error::WrongDevice { id });
        }
        self.write_register(REG_CONFIG, cal.config)?;
        self.write_register(REG_CALIBRATION, cal.calibration)?;
        delay.delay_us(CONVERSION_US);
        Ok(())
    }

    fn read(&mut self, _delay: &mut impl DelayNs) -> Result<Readings, Self::Error> {
        let m = self.measure()?;
        let derived = if m.overflow { Quality::Uncertain } else { Quality::Good };
        Ok(Readings::from_iter([
            ChannelReading {
                channel: 0,
                unit: Unit::Milliampere,
                value: m.current_ma,
                quality: derived,
            },
            ChannelReading::good(1, Unit::Volt, m.bus_v),
            ChannelReading { channel: 2, unit: Unit::Watt, value: m.power_w, quality: derived },
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::FaultCode;
    use crate::sensor::read_or_fault;
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::delay::{CheckedDelay, NoopDelay, Transaction as D};
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};
    use std::vec;
    use std::vec::Vec;

    const ADDR: u8 = 0x40;
    /// 10 mΩ sized for 16.384 A: Cal = 0.04096 / (0.5 mA × 0.01 Ω) = 8192 (0x2000), current
    /// LSB 0.5 mA, power LSB 10 mW; 163.84 mV full scale needs PGA /8 (config 0x399F).
    const SHUNT: Shunt = Shunt { resistance_milliohm: 10, max_current_ma: 16_384 };

    fn init_transactions() -> Vec<T> {
        vec![
            T::write(ADDR, vec![0x00, 0x80, 0x00]),
            T::write_read(ADDR, vec![0x00], vec![0x39, 0x9F]),
            T::write(ADDR, vec![0x00, 0x39, 0x9F]),
            T::write(ADDR, vec![0x05, 0x20, 0x00]),
        ]
    }

    fn measurement_transactions(bus: [u8; 2], current: [u8; 2], power: [u8; 2]) -> Vec<T> {
        vec![
            T::write_read(ADDR, vec![0x02], bus.to_vec()),
            T::write_read(ADDR, vec![0x04], current.to_vec()),
            T::write_read(ADDR, vec![0x03], power.to_vec()),
        ]
    }

    #[test]
    fn calibration_follows_the_datasheet_formula() {
        let cal = Calibration::new(SHUNT).unwrap();
        assert_eq!(cal.calibration, 8192);
        assert_eq!(cal.config, 0x399F);
        assert_eq!(cal.current_lsb_ma, 0.5);
        assert_eq!(cal.power_lsb_w, 0.01);
    }

    #[test]
    fn the_datasheet_example_shunt_gets_pga_8_and_an_even_calibration() {
        // 0.1 Ω, 2 A: trunc(0.04096 / (61.035 µA × 0.1 Ω)) = 6711, made even: 6710.
        let cal =
            Calibration::new(Shunt { resistance_milliohm: 100, max_current_ma: 2_000 }).unwrap();
        assert_eq!(cal.calibration, 6710);
        assert_eq!(cal.config >> 11 & 0b11, 0b11);
    }

    #[test]
    fn a_small_shunt_voltage_selects_pga_1() {
        // 100 mΩ × 400 mA = 40 mV: PG = 00, config 0x219F.
        let cal =
            Calibration::new(Shunt { resistance_milliohm: 100, max_current_ma: 400 }).unwrap();
        assert_eq!(cal.config, 0x219F);
    }

    #[test]
    fn shunts_that_cannot_be_programmed_are_refused() {
        // 400 mV full scale, zero current, and a calibration beyond 16 bits.
        assert_eq!(
            Calibration::new(Shunt { resistance_milliohm: 100, max_current_ma: 4_000 }),
            None
        );
        assert_eq!(Calibration::new(Shunt { resistance_milliohm: 100, max_current_ma: 0 }), None);
        assert_eq!(Calibration::new(Shunt { resistance_milliohm: 1, max_current_ma: 10 }), None);
    }

    #[test]
    fn init_resets_checks_and_programs_config_and_calibration() {
        let mut i2c = Mock::new(&init_transactions());
        let mut delay = CheckedDelay::new(&[D::delay_us(1_100)]);
        let mut ina = Ina219::new(i2c.clone(), ADDR, SHUNT);
        ina.init(&mut delay).unwrap();
        ina.release();
        i2c.done();
        delay.done();
    }

    #[test]
    fn a_device_with_another_reset_value_is_wrong_device() {
        let mut i2c = Mock::new(&[
            T::write(ADDR, vec![0x00, 0x80, 0x00]),
            T::write_read(ADDR, vec![0x00], vec![0x41, 0x27]),
        ]);
        let mut ina = Ina219::new(i2c.clone(), ADDR, SHUNT);
        assert_eq!(ina.init(&mut NoopDelay::new()), Err(Error::WrongDevice { id: 0x4127 }));
        i2c.done();
    }

    #[test]
    fn a_measurement_converts_to_milliamperes_volts_and_watts() {
        // Bus 12 V = 3000 × 4 mV → 3000 << 3 | CNVR = 0x5DC2; current 2000 × 0.5 mA = 1 A;
        // power = 2000 × 3000 / 5000 = 1200 × 10 mW = 12 W.
        let mut expected = init_transactions();
        expected.extend(measurement_transactions([0x5D, 0xC2], [0x07, 0xD0], [0x04, 0xB0]));
        let mut i2c = Mock::new(&expected);
        let mut ina = Ina219::new(i2c.clone(), ADDR, SHUNT);
        let mut delay = NoopDelay::new();
        ina.init(&mut delay).unwrap();
        let readings = ina.read(&mut delay).unwrap();
        assert_eq!(
            readings.as_slice(),
            &[
                ChannelReading::good(0, Unit::Milliampere, 1000.0),
                ChannelReading::good(1, Unit::Volt, 12.0),
                ChannelReading::good(2, Unit::Watt, 12.0),
            ]
        );
        i2c.done();
    }

    #[test]
    fn a_reverse_current_is_negative() {
        let mut i2c = Mock::new(&measurement_transactions([0x5D, 0xC2], [0xFF, 0x38], [0, 0]));
        let mut ina = Ina219::new(i2c.clone(), ADDR, SHUNT);
        assert_eq!(ina.measure().unwrap().current_ma, -100.0);
        i2c.done();
    }

    #[test]
    fn the_overflow_flag_makes_current_and_power_uncertain() {
        let mut i2c =
            Mock::new(&measurement_transactions([0x5D, 0xC1], [0x7F, 0xFF], [0xFF, 0xFF]));
        let mut ina = Ina219::new(i2c.clone(), ADDR, SHUNT);
        let readings = ina.read(&mut NoopDelay::new()).unwrap();
        let qualities: Vec<Quality> = readings.iter().map(|r| r.quality).collect();
        assert_eq!(qualities, [Quality::Uncertain, Quality::Good, Quality::Uncertain]);
        i2c.done();
    }

    #[test]
    fn a_bus_error_becomes_bus_fault_readings() {
        let mut i2c =
            Mock::new(&[T::write_read(ADDR, vec![0x02], vec![0, 0]).with_error(ErrorKind::Other)]);
        let mut ina = Ina219::new(i2c.clone(), ADDR, SHUNT);
        let readings = read_or_fault(&mut ina, &mut NoopDelay::new());
        let units: Vec<Unit> = readings.iter().map(|r| r.unit).collect();
        assert_eq!(units, [Unit::Milliampere, Unit::Volt, Unit::Watt]);
        assert!(readings.iter().all(|r| r.quality == Quality::Fault(FaultCode::Bus)));
        i2c.done();
    }
}
