//! Bosch BME280: temperature, relative humidity and pressure over I2C.
//!
//! # Operation (datasheet BST-BME280-DS002)
//!
//! ```text
//! init:  read 0xD0 == 0x60 (chip id)
//!        write 0xE0 = 0xB6 (soft reset), wait 2 ms (start-up time)
//!        poll 0xF3 bit 0 (im_update) until the NVM copy is done
//!        read 0x88..=0xA1 (26 bytes) and 0xE1..=0xE7 (7 bytes): trimming parameters
//!        write 0xF2 = 0x01 (ctrl_hum: humidity ×1; only takes effect with the next 0xF4 write)
//!        write 0xF5 = 0x00 (config: filter off)
//! read:  write 0xF4 = 0x25 (ctrl_meas: temperature ×1, pressure ×1, forced mode)
//!        wait 10 ms (t_measure,max at ×1/×1/×1 is 9.3 ms, datasheet §9.1)
//!        read 0xF7..=0xFE (8 bytes): press[19:0], temp[19:0], hum[15:0]
//! ```
//!
//! Forced mode with ×1 oversampling and no filter is the datasheet's "weather monitoring"
//! setting (§3.5.1): the sensor sleeps between reads, so it does not self-heat, and the firmware
//! decides the sampling rate.
//!
//! # Compensation
//!
//! The integer formulas of datasheet §4.2.3 (32-bit temperature and humidity, 64-bit
//! pressure), transcribed operation by operation. Where the C code would overflow (only with
//! corrupt trimming data) the arithmetic wraps instead of panicking; a zero divisor in the
//! pressure formula is [`Error::InvalidData`]. A data register still at its reset value
//! (0x80000 for temperature and pressure, 0x8000 for humidity) means no measurement ran and is
//! also [`Error::InvalidData`].

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

use super::Error;
use crate::reading::{ChannelReading, Unit};
use crate::sensor::{Readings, Sensor};

/// The address with SDO to GND.
pub const ADDRESS_PRIMARY: u8 = 0x76;
/// The address with SDO to VDDIO.
pub const ADDRESS_SECONDARY: u8 = 0x77;

const REG_CALIB_00: u8 = 0x88;
const REG_CHIP_ID: u8 = 0xD0;
const REG_RESET: u8 = 0xE0;
const REG_CALIB_26: u8 = 0xE1;
const REG_CTRL_HUM: u8 = 0xF2;
const REG_STATUS: u8 = 0xF3;
const REG_CTRL_MEAS: u8 = 0xF4;
const REG_CONFIG: u8 = 0xF5;
const REG_PRESS_MSB: u8 = 0xF7;

const CHIP_ID: u8 = 0x60;
const RESET_COMMAND: u8 = 0xB6;
/// status: the NVM data are being copied to the image registers.
const STATUS_IM_UPDATE: u8 = 0x01;
/// ctrl_hum: osrs_h = ×1.
const CTRL_HUM_X1: u8 = 0b001;
/// ctrl_meas: osrs_t = ×1 (bits 7..5), osrs_p = ×1 (bits 4..2), mode = forced (bits 1..0).
const CTRL_MEAS_FORCED_X1: u8 = (0b001 << 5) | (0b001 << 2) | 0b01;
/// config: t_sb = 0.5 ms (unused in forced mode), filter off, no 3-wire SPI.
const CONFIG_FILTER_OFF: u8 = 0x00;

/// Start-up time after a soft reset (datasheet table 1, t_startup).
const STARTUP_MS: u32 = 2;
/// How often to poll im_update after the start-up time before giving up.
const NVM_COPY_POLLS: u32 = 5;
/// Maximum measurement time at ×1/×1/×1, rounded up (datasheet §9.1: 9.3 ms).
const MEASUREMENT_MS: u32 = 10;

/// The trimming parameters stored in the chip's NVM (datasheet table 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Calibration {
    pub dig_t1: u16,
    pub dig_t2: i16,
    pub dig_t3: i16,
    pub dig_p1: u16,
    pub dig_p2: i16,
    pub dig_p3: i16,
    pub dig_p4: i16,
    pub dig_p5: i16,
    pub dig_p6: i16,
    pub dig_p7: i16,
    pub dig_p8: i16,
    pub dig_p9: i16,
    pub dig_h1: u8,
    pub dig_h2: i16,
    pub dig_h3: u8,
    pub dig_h4: i16,
    pub dig_h5: i16,
    pub dig_h6: i8,
}

impl Calibration {
    /// Parses registers 0x88..=0xA1 (`low`) and 0xE1..=0xE7 (`high`).
    pub fn from_registers(low: &[u8; 26], high: &[u8; 7]) -> Calibration {
        let u16_at = |i: usize| u16::from_le_bytes([low[i], low[i + 1]]);
        let i16_at = |i: usize| i16::from_le_bytes([low[i], low[i + 1]]);
        Calibration {
            dig_t1: u16_at(0),
            dig_t2: i16_at(2),
            dig_t3: i16_at(4),
            dig_p1: u16_at(6),
            dig_p2: i16_at(8),
            dig_p3: i16_at(10),
            dig_p4: i16_at(12),
            dig_p5: i16_at(14),
            dig_p6: i16_at(16),
            dig_p7: i16_at(18),
            dig_p8: i16_at(20),
            dig_p9: i16_at(22),
            // 0xA0 is unused.
            dig_h1: low[25],
            dig_h2: i16::from_le_bytes([high[0], high[1]]),
            dig_h3: high[2],
            // 0xE4 holds H4[11:4] and 0xE6 holds H5[11:4], both signed; 0xE5 holds H4[3:0] in
            // its low nibble and H5[3:0] in its high nibble.
            dig_h4: (i16::from(high[3] as i8) << 4) | i16::from(high[4] & 0x0F),
            dig_h5: (i16::from(high[5] as i8) << 4) | i16::from(high[4] >> 4),
            dig_h6: high[6] as i8,
        }
    }
}

/// One compensated measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Temperature in 0.01 °C.
    pub temperature_centi_c: i32,
    /// Pressure in Pa as Q24.8 (Pa × 256).
    pub pressure_q24_8: u32,
    /// Relative humidity in %RH as Q22.10 (%RH × 1024).
    pub humidity_q22_10: u32,
}

impl Measurement {
    /// Temperature in °C.
    pub fn celsius(&self) -> f32 {
        self.temperature_centi_c as f32 / 100.0
    }

    /// Pressure in hPa.
    pub fn hectopascal(&self) -> f32 {
        (f64::from(self.pressure_q24_8) / 25_600.0) as f32
    }

    /// Relative humidity in %RH.
    pub fn percent_rh(&self) -> f32 {
        self.humidity_q22_10 as f32 / 1024.0
    }
}

/// Temperature in 0.01 °C and t_fine (datasheet `BME280_compensate_T_int32`).
pub fn compensate_temperature(cal: &Calibration, adc_t: i32) -> (i32, i32) {
    let t1 = i32::from(cal.dig_t1);
    let t2 = i32::from(cal.dig_t2);
    let t3 = i32::from(cal.dig_t3);
    let var1 = ((adc_t >> 3).wrapping_sub(t1 << 1)).wrapping_mul(t2) >> 11;
    let d = (adc_t >> 4).wrapping_sub(t1);
    let var2 = ((d.wrapping_mul(d) >> 12).wrapping_mul(t3)) >> 14;
    let t_fine = var1.wrapping_add(var2);
    let t = (t_fine.wrapping_mul(5).wrapping_add(128)) >> 8;
    (t, t_fine)
}

/// Pressure in Pa as Q24.8 (datasheet `BME280_compensate_P_int64`); `None` where the
/// datasheet returns 0 to avoid a division by zero.
pub fn compensate_pressure(cal: &Calibration, adc_p: i32, t_fine: i32) -> Option<u32> {
    let mut var1 = i64::from(t_fine) - 128_000;
    let mut var2 = var1.wrapping_mul(var1).wrapping_mul(i64::from(cal.dig_p6));
    var2 = var2.wrapping_add(var1.wrapping_mul(i64::from(cal.dig_p5)) << 17);
    var2 = var2.wrapping_add(i64::from(cal.dig_p4) << 35);
    var1 = (var1.wrapping_mul(var1).wrapping_mul(i64::from(cal.dig_p3)) >> 8)
        .wrapping_add(var1.wrapping_mul(i64::from(cal.dig_p2)) << 12);
    var1 = ((1i64 << 47).wrapping_add(var1)).wrapping_mul(i64::from(cal.dig_p1)) >> 33;
    if var1 == 0 {
        return None;
    }
    let mut p = 1_048_576 - i64::from(adc_p);
    p = ((p << 31).wrapping_sub(var2)).wrapping_mul(3125).checked_div(var1)?;
    var1 = i64::from(cal.dig_p9).wrapping_mul(p >> 13).wrapping_mul(p >> 13) >> 25;
    var2 = i64::from(cal.dig_p8).wrapping_mul(p) >> 19;
    p = (p.wrapping_add(var1).wrapping_add(var2) >> 8).wrapping_add(i64::from(cal.dig_p7) << 4);
    // The C code casts to uint32_t; a value outside it only comes from corrupt trimming data.
    u32::try_from(p).ok()
}

/// Relative humidity in %RH as Q22.10 (datasheet `bme280_compensate_H_int32`).
pub fn compensate_humidity(cal: &Calibration, adc_h: i32, t_fine: i32) -> u32 {
    let h1 = i32::from(cal.dig_h1);
    let h2 = i32::from(cal.dig_h2);
    let h3 = i32::from(cal.dig_h3);
    let h4 = i32::from(cal.dig_h4);
    let h5 = i32::from(cal.dig_h5);
    let h6 = i32::from(cal.dig_h6);
    let x = t_fine.wrapping_sub(76_800);
    let a = ((adc_h << 14).wrapping_sub(h4 << 20).wrapping_sub(h5.wrapping_mul(x)))
        .wrapping_add(16_384)
        >> 15;
    let b = (((x.wrapping_mul(h6) >> 10)
        .wrapping_mul((x.wrapping_mul(h3) >> 11).wrapping_add(32_768))
        >> 10)
        .wrapping_add(2_097_152))
    .wrapping_mul(h2)
    .wrapping_add(8192)
        >> 14;
    let mut x = a.wrapping_mul(b);
    let sq = ((x >> 15).wrapping_mul(x >> 15)) >> 7;
    x = x.wrapping_sub(sq.wrapping_mul(h1) >> 4);
    let x = x.clamp(0, 419_430_400);
    (x >> 12) as u32
}

/// Compensates one burst read of 0xF7..=0xFE.
pub fn compensate(cal: &Calibration, data: &[u8; 8]) -> Option<Measurement> {
    let adc_p = (i32::from(data[0]) << 12) | (i32::from(data[1]) << 4) | (i32::from(data[2]) >> 4);
    let adc_t = (i32::from(data[3]) << 12) | (i32::from(data[4]) << 4) | (i32::from(data[5]) >> 4);
    let adc_h = (i32::from(data[6]) << 8) | i32::from(data[7]);
    // Reset values: the measurement was skipped or never ran.
    if adc_t == 0x80000 || adc_p == 0x80000 || adc_h == 0x8000 {
        return None;
    }
    let (temperature_centi_c, t_fine) = compensate_temperature(cal, adc_t);
    let pressure_q24_8 = compensate_pressure(cal, adc_p, t_fine)?;
    let humidity_q22_10 = compensate_humidity(cal, adc_h, t_fine);
    Some(Measurement { temperature_centi_c, pressure_q24_8, humidity_q22_10 })
}

/// A BME280 on an I2C bus.
#[derive(Debug)]
pub struct Bme280<I2C> {
    i2c: I2C,
    address: u8,
    calibration: Option<Calibration>,
}

impl<I2C: I2c> Bme280<I2C> {
    /// A driver for the chip at `address` ([`ADDRESS_PRIMARY`] or [`ADDRESS_SECONDARY`]).
    /// No I/O until [`Sensor::init`].
    pub fn new(i2c: I2C, address: u8) -> Self {
        Bme280 { i2c, address, calibration: None }
    }

    /// Gives the bus back.
    pub fn release(self) -> I2C {
        self.i2c
    }

    /// The trimming parameters read by [`Sensor::init`], if it ran.
    pub fn calibration(&self) -> Option<&Calibration> {
        self.calibration.as_ref()
    }

    /// Runs one forced-mode measurement and compensates it.
    pub fn measure(&mut self, delay: &mut impl DelayNs) -> Result<Measurement, Error<I2C::Error>> {
        let result = self.try_measure(delay);
        if result.is_err() {
            // The chip may have been replugged or browned out (its ctrl_hum is then lost and
            // humidity reads 0x8000): configure it again on the next read.
            self.calibration = None;
        }
        result
    }

    fn try_measure(&mut self, delay: &mut impl DelayNs) -> Result<Measurement, Error<I2C::Error>> {
        // A read before init (or after a failed read) runs init first.
        let calibration = match self.calibration {
            Some(calibration) => calibration,
            None => self.configure(delay)?,
        };
        self.write(REG_CTRL_MEAS, CTRL_MEAS_FORCED_X1)?;
        delay.delay_ms(MEASUREMENT_MS);
        let mut data = [0u8; 8];
        self.i2c.write_read(self.address, &[REG_PRESS_MSB], &mut data)?;
        compensate(&calibration, &data).ok_or(Error::InvalidData)
    }

    fn configure(&mut self, delay: &mut impl DelayNs) -> Result<Calibration, Error<I2C::Error>> {
        self.calibration = None;
        let id = self.read_register(REG_CHIP_ID)?;
        if id != CHIP_ID {
            return Err(Error::WrongDevice { id: u16::from(id) });
        }
        self.write(REG_RESET, RESET_COMMAND)?;
        delay.delay_ms(STARTUP_MS);
        let mut copied = false;
        for _ in 0..NVM_COPY_POLLS {
            if self.read_register(REG_STATUS)? & STATUS_IM_UPDATE == 0 {
                copied = true;
                break;
            }
            delay.delay_ms(1);
        }
        if !copied {
            return Err(Error::Timeout);
        }
        let mut low = [0u8; 26];
        self.i2c.write_read(self.address, &[REG_CALIB_00], &mut low)?;
        let mut high = [0u8; 7];
        self.i2c.write_read(self.address, &[REG_CALIB_26], &mut high)?;
        let calibration = Calibration::from_registers(&low, &high);
        // dig_T1 and dig_P1 are never 0 on a real chip (P1 = 0 divides by zero).
        if calibration.dig_t1 == 0 || calibration.dig_p1 == 0 {
            return Err(Error::InvalidData);
        }
        self.write(REG_CTRL_HUM, CTRL_HUM_X1)?;
        self.write(REG_CONFIG, CONFIG_FILTER_OFF)?;
        self.calibration = Some(calibration);
        Ok(calibration)
    }

    fn read_register(&mut self, register: u8) -> Result<u8, Error<I2C::Error>> {
        let mut value = [0u8];
        self.i2c.write_read(self.address, &[register], &mut value)?;
        Ok(value[0])
    }

    fn write(&mut self, register: u8, value: u8) -> Result<(), Error<I2C::Error>> {
        self.i2c.write(self.address, &[register, value])?;
        Ok(())
    }
}

impl<I2C: I2c> Sensor for Bme280<I2C> {
    type Error = Error<I2C::Error>;
    const CHANNELS: &'static [Unit] = &[Unit::Celsius, Unit::PercentRh, Unit::Hectopascal];

    fn init(&mut self, delay: &mut impl DelayNs) -> Result<(), Self::Error> {
        self.configure(delay).map(|_| ())
    }

    fn read(&mut self, delay: &mut impl DelayNs) -> Result<Readings, Self::Error> {
        let m = self.measure(delay)?;
        Ok(Readings::from_iter([
            ChannelReading::good(0, Unit::Celsius, m.celsius()),
            ChannelReading::good(1, Unit::PercentRh, m.percent_rh()),
            ChannelReading::good(2, Unit::Hectopascal, m.hectopascal()),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{FaultCode, Quality};
    use crate::sensor::read_or_fault;
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::delay::{CheckedDelay, NoopDelay, Transaction as D};
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};
    use std::vec;
    use std::vec::Vec;

    const ADDR: u8 = 0x76;

    /// The BMP280 datasheet's worked example (§3.12) for T and P; plausible humidity values.
    /// dig_T1..3 = 27504, 26435, -1000; dig_P1..9 = 36477, -10685, 3024, 2855, 140, -7, 15500,
    /// -14600, 6000; dig_H1..6 = 75, 362, 0, 313, 50, 30.
    const CALIB_88: [u8; 26] = [
        0x70, 0x6B, 0x43, 0x67, 0x18, 0xFC, 0x7D, 0x8E, 0x43, 0xD6, 0xD0, 0x0B, 0x27, 0x0B, 0x8C,
        0x00, 0xF9, 0xFF, 0x8C, 0x3C, 0xF8, 0xC6, 0x70, 0x17, 0x00, 0x4B,
    ];
    const CALIB_E1: [u8; 7] = [0x6A, 0x01, 0x00, 0x13, 0x29, 0x03, 0x1E];
    /// adc_P = 415148, adc_T = 519888 (the worked example), adc_H = 30000.
    const DATA_F7: [u8; 8] = [0x65, 0x5A, 0xC0, 0x7E, 0xED, 0x00, 0x75, 0x30];

    fn init_transactions() -> Vec<T> {
        vec![
            T::write_read(ADDR, vec![0xD0], vec![0x60]),
            T::write(ADDR, vec![0xE0, 0xB6]),
            T::write_read(ADDR, vec![0xF3], vec![0x01]),
            T::write_read(ADDR, vec![0xF3], vec![0x00]),
            T::write_read(ADDR, vec![0x88], CALIB_88.to_vec()),
            T::write_read(ADDR, vec![0xE1], CALIB_E1.to_vec()),
            T::write(ADDR, vec![0xF2, 0x01]),
            T::write(ADDR, vec![0xF5, 0x00]),
        ]
    }

    fn measurement_transactions(data: [u8; 8]) -> Vec<T> {
        vec![T::write(ADDR, vec![0xF4, 0x25]), T::write_read(ADDR, vec![0xF7], data.to_vec())]
    }

    fn example() -> Calibration {
        Calibration::from_registers(&CALIB_88, &CALIB_E1)
    }

    #[test]
    fn trimming_registers_parse_into_the_datasheet_parameters() {
        let c = example();
        assert_eq!((c.dig_t1, c.dig_t2, c.dig_t3), (27504, 26435, -1000));
        assert_eq!(
            [c.dig_p2, c.dig_p3, c.dig_p4, c.dig_p5, c.dig_p6, c.dig_p7, c.dig_p8, c.dig_p9],
            [-10685, 3024, 2855, 140, -7, 15500, -14600, 6000]
        );
        assert_eq!(c.dig_p1, 36477);
        assert_eq!((c.dig_h1, c.dig_h2, c.dig_h3), (75, 362, 0));
        assert_eq!((c.dig_h4, c.dig_h5, c.dig_h6), (313, 50, 30));
    }

    #[test]
    fn negative_h4_and_h5_are_sign_extended_from_their_split_nibbles() {
        // H4 = -2 = 0xFFE: 0xE4 = 0xFF, 0xE5[3:0] = 0xE; H5 = -3 = 0xFFD: 0xE6 = 0xFF,
        // 0xE5[7:4] = 0xD.
        let c = Calibration::from_registers(&CALIB_88, &[0, 0, 0, 0xFF, 0xDE, 0xFF, 0]);
        assert_eq!((c.dig_h4, c.dig_h5), (-2, -3));
    }

    #[test]
    fn temperature_matches_the_datasheet_example() {
        assert_eq!(compensate_temperature(&example(), 519_888), (2508, 128_422));
    }

    #[test]
    fn pressure_matches_the_64_bit_formula_evaluated_by_hand() {
        // 100653.25 Pa (the datasheet's floating-point example gives 100653.27 Pa).
        assert_eq!(compensate_pressure(&example(), 415_148, 128_422), Some(25_767_233));
    }

    #[test]
    fn humidity_matches_the_formula_evaluated_by_hand() {
        assert_eq!(compensate_humidity(&example(), 30_000, 128_422), 56_317);
    }

    #[test]
    fn humidity_agrees_with_the_datasheet_floating_point_formula() {
        // bme280_compensate_H_double, written out independently of the integer version.
        let (h1, h2, h3, h4, h5, h6) = (75.0, 362.0, 0.0, 313.0, 50.0, 30.0);
        let v = 128_422.0 - 76_800.0;
        let v = (30_000.0 - (h4 * 64.0 + h5 / 16_384.0 * v))
            * (h2 / 65_536.0 * (1.0 + h6 / 67_108_864.0 * v * (1.0 + h3 / 67_108_864.0 * v)));
        let expected: f64 = v * (1.0 - h1 * v / 524_288.0);
        let actual = f64::from(compensate_humidity(&example(), 30_000, 128_422)) / 1024.0;
        assert!((actual - expected).abs() < 0.01, "{actual} vs {expected}");
    }

    #[test]
    fn compensation_never_panics_on_extreme_inputs() {
        let extremes = [
            Calibration::default(),
            Calibration::from_registers(&[0xFF; 26], &[0xFF; 7]),
            Calibration::from_registers(&[0x80; 26], &[0x80; 7]),
            Calibration::from_registers(&[0x7F; 26], &[0x7F; 7]),
        ];
        for cal in &extremes {
            for data in [[0u8; 8], [0xFF; 8], [0x7F; 8], DATA_F7] {
                let _ = compensate(cal, &data);
            }
        }
    }

    #[test]
    fn init_then_read_gives_celsius_rh_and_hpa() {
        let mut expected = init_transactions();
        expected.extend(measurement_transactions(DATA_F7));
        let mut i2c = Mock::new(&expected);
        let mut delay = CheckedDelay::new(&[D::delay_ms(2), D::delay_ms(1), D::delay_ms(10)]);
        let mut bme = Bme280::new(i2c.clone(), ADDR);
        bme.init(&mut delay).unwrap();
        let readings = bme.read(&mut delay).unwrap();
        assert_eq!(
            readings.as_slice(),
            &[
                ChannelReading::good(0, Unit::Celsius, 25.08),
                ChannelReading::good(1, Unit::PercentRh, 56_317.0 / 1024.0),
                ChannelReading::good(2, Unit::Hectopascal, (25_767_233.0 / 25_600.0) as f32),
            ]
        );
        bme.release();
        i2c.done();
        delay.done();
    }

    #[test]
    fn a_wrong_chip_id_is_wrong_device() {
        // 0x58 is the BMP280, which has no humidity sensor.
        let mut i2c = Mock::new(&[T::write_read(ADDR, vec![0xD0], vec![0x58])]);
        let mut bme = Bme280::new(i2c.clone(), ADDR);
        assert_eq!(bme.init(&mut NoopDelay::new()), Err(Error::WrongDevice { id: 0x58 }));
        i2c.done();
    }

    #[test]
    fn a_skipped_measurement_is_invalid_data() {
        let mut expected = init_transactions();
        expected.extend(measurement_transactions([0x80, 0, 0, 0x80, 0, 0, 0x80, 0]));
        let mut i2c = Mock::new(&expected);
        let mut bme = Bme280::new(i2c.clone(), ADDR);
        bme.init(&mut NoopDelay::new()).unwrap();
        assert_eq!(bme.read(&mut NoopDelay::new()), Err(Error::InvalidData));
        i2c.done();
    }

    #[test]
    fn a_bus_error_becomes_fault_readings_and_the_next_read_configures_again() {
        let mut expected = init_transactions();
        expected.push(T::write(ADDR, vec![0xF4, 0x25]).with_error(ErrorKind::Other));
        expected.extend(init_transactions());
        expected.extend(measurement_transactions(DATA_F7));
        let mut i2c = Mock::new(&expected);
        let mut bme = Bme280::new(i2c.clone(), ADDR);
        let mut delay = NoopDelay::new();
        bme.init(&mut delay).unwrap();
        let faults = read_or_fault(&mut bme, &mut delay);
        assert_eq!(faults.len(), 3);
        assert!(faults.iter().all(|r| r.quality == Quality::Fault(FaultCode::Bus)));
        assert_eq!(faults[2].unit, Unit::Hectopascal);
        let readings = read_or_fault(&mut bme, &mut delay);
        assert_eq!(readings[0], ChannelReading::good(0, Unit::Celsius, 25.08));
        i2c.done();
    }
}
