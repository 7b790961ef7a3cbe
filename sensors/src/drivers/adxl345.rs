//! Analog Devices ADXL345: vibration (RMS and peak acceleration) over I2C.
//!
//! # Operation (datasheet Rev. G)
//!
//! ```text
//! init:  read 0x00 == 0xE5 (DEVID)
//!        write 0x2D = 0x00 (POWER_CTL: standby while configuring)
//!        write 0x2C = rate (BW_RATE: output data rate, normal power)
//!        write 0x31 = 0x0B (DATA_FORMAT: FULL_RES, ±16 g, right-justified)
//!        write 0x2D = 0x08 (POWER_CTL: Measure)
//! read:  block_len × { wait 1/ODR; read 0x32..=0x37 (DATAX0..DATAZ1, little-endian i16) }
//! ```
//!
//! Full resolution keeps the scale at 3.9 mg/LSB (1/256 g) in every range; ±16 g leaves
//! headroom for shocks on rotating machinery. Values are 13-bit (−4096..=4095); a value
//! outside that range cannot come from the chip and is [`Error::InvalidData`].
//!
//! # Vibration from a block
//!
//! A reading summarises one block of `block_len` samples:
//!
//! - The mean of each axis is removed first: it is gravity (and sensor offset), the static
//!   part; what remains is vibration.
//! - **RMS** (channel 0, g): `sqrt(Σ_axes var_axis)`, the RMS magnitude of the dynamic
//!   acceleration vector, where `var_axis = Σ(x − mean)² / n`. Computed exactly in integers
//!   from running sums (`n·Σx² − (Σx)²`), so no sample buffer is needed.
//! - **Peak** (channel 1, g): the largest `|x − mean|` over all samples and axes (from the
//!   running min and max of each axis).
//! - Quality is [`Quality::Uncertain`] if any sample sat at the end of the range (clipped).
//!
//! Samples are spaced by waiting one output-data period before each read, so no sample is
//! read twice; the I2C transfer (≈0.2 ms at 400 kHz) makes the effective rate a little lower
//! than the ODR, which RMS and peak do not depend on. Above 800 Hz use SPI or the FIFO (not
//! implemented here).

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

use super::Error;
use crate::reading::{ChannelReading, Quality, Unit};
use crate::sensor::{Readings, Sensor};

/// The address with ALT ADDRESS to GND.
pub const ADDRESS_PRIMARY: u8 = 0x53;
/// The address with ALT ADDRESS to VDDIO.
pub const ADDRESS_SECONDARY: u8 = 0x1D;

const REG_DEVID: u8 = 0x00;
const REG_BW_RATE: u8 = 0x2C;
const REG_POWER_CTL: u8 = 0x2D;
const REG_DATA_FORMAT: u8 = 0x31;
const REG_DATAX0: u8 = 0x32;

const DEVID: u8 = 0xE5;
const POWER_CTL_STANDBY: u8 = 0x00;
const POWER_CTL_MEASURE: u8 = 0x08;
/// DATA_FORMAT: FULL_RES (bit 3), range ±16 g (bits 1..0 = 11).
const DATA_FORMAT_FULL_RES_16G: u8 = 0x08 | 0x03;
/// Full-resolution scale: 3.9 mg/LSB, i.e. 256 LSB per g.
const LSB_PER_G: f32 = 256.0;
/// Full-resolution data is 13 bits, sign-extended.
const RAW_MIN: i16 = -4096;
const RAW_MAX: i16 = 4095;

/// Output data rate (BW_RATE bits 3..0, normal power).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataRate {
    /// 100 Hz (the chip's default).
    Hz100,
    /// 200 Hz.
    Hz200,
    /// 400 Hz.
    Hz400,
    /// 800 Hz (the most polled I2C at 400 kHz keeps up with).
    Hz800,
}

impl DataRate {
    fn code(self) -> u8 {
        match self {
            DataRate::Hz100 => 0x0A,
            DataRate::Hz200 => 0x0B,
            DataRate::Hz400 => 0x0C,
            DataRate::Hz800 => 0x0D,
        }
    }

    /// The sample period in µs.
    pub fn period_us(self) -> u32 {
        match self {
            DataRate::Hz100 => 10_000,
            DataRate::Hz200 => 5_000,
            DataRate::Hz400 => 2_500,
            DataRate::Hz800 => 1_250,
        }
    }
}

/// How the driver samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// The output data rate.
    pub rate: DataRate,
    /// Samples per reading (at least 2: one sample has no vibration).
    pub block_len: u16,
}

impl Default for Config {
    /// 800 Hz, 64 samples: an 80 ms block, enough for 50/60 Hz machinery and its harmonics.
    fn default() -> Self {
        Config { rate: DataRate::Hz800, block_len: 64 }
    }
}

/// Running sums of one axis over a block.
#[derive(Debug, Clone, Copy)]
struct AxisStats {
    sum: i64,
    sum_sq: i64,
    min: i16,
    max: i16,
}

impl AxisStats {
    const EMPTY: AxisStats = AxisStats { sum: 0, sum_sq: 0, min: i16::MAX, max: i16::MIN };

    fn add(&mut self, x: i16) {
        let x64 = i64::from(x);
        self.sum += x64;
        self.sum_sq += x64 * x64;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    /// n² · variance, exact: n·Σx² − (Σx)² (≥ 0 by Cauchy–Schwarz).
    fn n2_variance(&self, n: i64) -> u128 {
        let v =
            i128::from(n) * i128::from(self.sum_sq) - i128::from(self.sum) * i128::from(self.sum);
        u128::try_from(v).unwrap_or(0)
    }

    /// n · the largest |x − mean|.
    fn n_peak(&self, n: i64) -> i64 {
        let above = n * i64::from(self.max) - self.sum;
        let below = self.sum - n * i64::from(self.min);
        above.max(below)
    }

    fn clipped(&self) -> bool {
        self.min <= RAW_MIN || self.max >= RAW_MAX
    }
}

/// Vibration over one block, in g.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Vibration {
    /// RMS magnitude of the acceleration after removing each axis's mean.
    pub rms_g: f32,
    /// Largest deviation of any axis from its mean.
    pub peak_g: f32,
    /// Some sample was at the end of the ±16 g range.
    pub clipped: bool,
}

/// Summarises raw full-resolution samples `[x, y, z]`; `None` for fewer than two samples or a
/// value the chip cannot produce.
pub fn vibration(samples: impl IntoIterator<Item = [i16; 3]>) -> Option<Vibration> {
    let mut axes = [AxisStats::EMPTY; 3];
    let mut n: i64 = 0;
    for sample in samples {
        for (axis, &x) in axes.iter_mut().zip(sample.iter()) {
            if !(RAW_MIN..=RAW_MAX).contains(&x) {
                return None;
            }
            axis.add(x);
        }
        n += 1;
    }
    summarise(&axes, n)
}

fn summarise(axes: &[AxisStats; 3], n: i64) -> Option<Vibration> {
    if n < 2 {
        return None;
    }
    let n2_var: u128 = axes.iter().map(|a| a.n2_variance(n)).sum();
    // sqrt(n²·var) = n·rms; scale by 2^16 inside the root (2^8 outside) to keep 8 more bits.
    let n_rms_q8 = (n2_var << 16).isqrt();
    let rms_counts = n_rms_q8 as f64 / 256.0 / n as f64;
    let n_peak = axes.iter().map(|a| a.n_peak(n)).max().unwrap_or(0);
    let peak_counts = n_peak as f64 / n as f64;
    Some(Vibration {
        rms_g: (rms_counts / f64::from(LSB_PER_G)) as f32,
        peak_g: (peak_counts / f64::from(LSB_PER_G)) as f32,
        clipped: axes.iter().any(AxisStats::clipped),
    })
}

/// An ADXL345 on an I2C bus.
#[derive(Debug)]
pub struct Adxl345<I2C> {
    i2c: I2C,
    address: u8,
    config: Config,
}

impl<I2C: I2c> Adxl345<I2C> {
    /// A driver for the chip at `address` ([`ADDRESS_PRIMARY`] or [`ADDRESS_SECONDARY`]) with
    /// the default [`Config`]. No I/O until [`Sensor::init`].
    pub fn new(i2c: I2C, address: u8) -> Self {
        Self::with_config(i2c, address, Config::default())
    }

    /// A driver with its own sampling configuration.
    pub fn with_config(i2c: I2C, address: u8, config: Config) -> Self {
        Adxl345 { i2c, address, config }
    }

    /// Gives the bus back.
    pub fn release(self) -> I2C {
        self.i2c
    }

    /// Reads one sample `[x, y, z]` in raw counts (1/256 g).
    pub fn sample(&mut self) -> Result<[i16; 3], Error<I2C::Error>> {
        let mut data = [0u8; 6];
        self.i2c.write_read(self.address, &[REG_DATAX0], &mut data)?;
        let raw = [
            i16::from_le_bytes([data[0], data[1]]),
            i16::from_le_bytes([data[2], data[3]]),
            i16::from_le_bytes([data[4], data[5]]),
        ];
        if raw.iter().any(|x| !(RAW_MIN..=RAW_MAX).contains(x)) {
            return Err(Error::InvalidData);
        }
        Ok(raw)
    }

    /// Samples one block and summarises it.
    pub fn measure(&mut self, delay: &mut impl DelayNs) -> Result<Vibration, Error<I2C::Error>> {
        if self.config.block_len < 2 {
            return Err(Error::InvalidConfig);
        }
        let mut axes = [AxisStats::EMPTY; 3];
        for _ in 0..self.config.block_len {
            delay.delay_us(self.config.rate.period_us());
            let sample = self.sample()?;
            for (axis, x) in axes.iter_mut().zip(sample) {
                axis.add(x);
            }
        }
        summarise(&axes, i64::from(self.config.block_len)).ok_or(Error::InvalidData)
    }

    fn write(&mut self, register: u8, value: u8) -> Result<(), Error<I2C::Error>> {
        self.i2c.write(self.address, &[register, value])?;
        Ok(())
    }
}

impl<I2C: I2c> Sensor for Adxl345<I2C> {
    type Error = Error<I2C::Error>;
    const CHANNELS: &'static [Unit] = &[Unit::G, Unit::G];

    fn init(&mut self, _delay: &mut impl DelayNs) -> Result<(), Self::Error> {
        let mut id = [0u8];
        self.i2c.write_read(self.address, &[REG_DEVID], &mut id)?;
        if id[0] != DEVID {
            return Err(Error::WrongDevice { id: u16::from(id[0]) });
        }
        self.write(REG_POWER_CTL, POWER_CTL_STANDBY)?;
        self.write(REG_BW_RATE, self.config.rate.code())?;
        self.write(REG_DATA_FORMAT, DATA_FORMAT_FULL_RES_16G)?;
        self.write(REG_POWER_CTL, POWER_CTL_MEASURE)?;
        Ok(())
    }

    fn read(&mut self, delay: &mut impl DelayNs) -> Result<Readings, Self::Error> {
        let v = self.measure(delay)?;
        let quality = if v.clipped { Quality::Uncertain } else { Quality::Good };
        Ok(Readings::from_iter([
            ChannelReading { channel: 0, unit: Unit::G, value: v.rms_g, quality },
            ChannelReading { channel: 1, unit: Unit::G, value: v.peak_g, quality },
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

    const ADDR: u8 = 0x53;

    fn init_transactions(rate_code: u8) -> Vec<T> {
        vec![
            T::write_read(ADDR, vec![0x00], vec![0xE5]),
            T::write(ADDR, vec![0x2D, 0x00]),
            T::write(ADDR, vec![0x2C, rate_code]),
            T::write(ADDR, vec![0x31, 0x0B]),
            T::write(ADDR, vec![0x2D, 0x08]),
        ]
    }

    fn sample_bytes(x: i16, y: i16, z: i16) -> Vec<u8> {
        [x, y, z].iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn init_checks_devid_and_enters_full_resolution_measurement() {
        let mut i2c = Mock::new(&init_transactions(0x0D));
        let mut adxl = Adxl345::new(i2c.clone(), ADDR);
        adxl.init(&mut NoopDelay::new()).unwrap();
        adxl.release();
        i2c.done();
    }

    #[test]
    fn a_wrong_devid_is_wrong_device() {
        let mut i2c = Mock::new(&[T::write_read(ADDR, vec![0x00], vec![0xE6])]);
        let mut adxl = Adxl345::new(i2c.clone(), ADDR);
        assert_eq!(adxl.init(&mut NoopDelay::new()), Err(Error::WrongDevice { id: 0xE6 }));
        i2c.done();
    }

    #[test]
    fn a_square_wave_on_x_over_gravity_on_z_is_one_g_rms_and_peak() {
        // x swings 0 ↔ 2 g (mean 1 g, deviation ±1 g); z is a constant 1 g of gravity.
        let config = Config { rate: DataRate::Hz100, block_len: 4 };
        let mut expected = init_transactions(0x0A);
        for x in [0, 512, 0, 512] {
            expected.push(T::write_read(ADDR, vec![0x32], sample_bytes(x, 0, 256)));
        }
        let mut i2c = Mock::new(&expected);
        let mut delay = CheckedDelay::new(&vec![D::delay_us(10_000); 4]);
        let mut adxl = Adxl345::with_config(i2c.clone(), ADDR, config);
        adxl.init(&mut delay).unwrap();
        let readings = adxl.read(&mut delay).unwrap();
        assert_eq!(
            readings.as_slice(),
            &[ChannelReading::good(0, Unit::G, 1.0), ChannelReading::good(1, Unit::G, 1.0)]
        );
        i2c.done();
        delay.done();
    }

    #[test]
    fn rms_combines_the_axes_and_peak_takes_the_largest_deviation() {
        // x: ±3 counts around 10, y: ±4 counts around −20 → RMS 5 counts; peak 4 counts.
        let samples = [[13, -16, 256], [7, -24, 256]];
        let v = vibration(samples).unwrap();
        assert_eq!(v.rms_g, 5.0 / 256.0);
        assert_eq!(v.peak_g, 4.0 / 256.0);
        assert!(!v.clipped);
    }

    #[test]
    fn a_constant_signal_has_no_vibration() {
        let v = vibration([[100, -3, 250]; 64]).unwrap();
        assert_eq!((v.rms_g, v.peak_g), (0.0, 0.0));
    }

    #[test]
    fn samples_at_the_end_of_the_range_are_uncertain() {
        let config = Config { rate: DataRate::Hz800, block_len: 2 };
        let mut expected = init_transactions(0x0D);
        expected.push(T::write_read(ADDR, vec![0x32], sample_bytes(4095, 0, 0)));
        expected.push(T::write_read(ADDR, vec![0x32], sample_bytes(0, 0, 0)));
        let mut i2c = Mock::new(&expected);
        let mut adxl = Adxl345::with_config(i2c.clone(), ADDR, config);
        let mut delay = NoopDelay::new();
        adxl.init(&mut delay).unwrap();
        let readings = adxl.read(&mut delay).unwrap();
        assert!(readings.iter().all(|r| r.quality == Quality::Uncertain));
        i2c.done();
    }

    #[test]
    fn an_impossible_sample_is_invalid_data() {
        let mut i2c = Mock::new(&[T::write_read(ADDR, vec![0x32], sample_bytes(0x7FFF, 0, 0))]);
        let mut adxl = Adxl345::new(i2c.clone(), ADDR);
        assert_eq!(adxl.sample(), Err(Error::InvalidData));
        i2c.done();
    }

    #[test]
    fn a_block_of_one_sample_is_refused() {
        let config = Config { rate: DataRate::Hz800, block_len: 1 };
        let mut i2c = Mock::new(&[]);
        let mut adxl = Adxl345::with_config(i2c.clone(), ADDR, config);
        assert_eq!(adxl.measure(&mut NoopDelay::new()), Err(Error::InvalidConfig));
        i2c.done();
    }

    #[test]
    fn a_bus_error_mid_block_becomes_bus_fault_readings() {
        let config = Config { rate: DataRate::Hz800, block_len: 4 };
        let mut i2c = Mock::new(&[
            T::write_read(ADDR, vec![0x32], sample_bytes(1, 2, 3)),
            T::write_read(ADDR, vec![0x32], vec![0; 6]).with_error(ErrorKind::Other),
        ]);
        let mut adxl = Adxl345::with_config(i2c.clone(), ADDR, config);
        let readings = read_or_fault(&mut adxl, &mut NoopDelay::new());
        assert_eq!(readings.len(), 2);
        assert!(readings.iter().all(|r| r.quality == Quality::Fault(FaultCode::Bus)));
        i2c.done();
    }

    #[test]
    fn extreme_blocks_do_not_overflow() {
        let v = vibration((0..u16::MAX).map(|i| if i % 2 == 0 { [4095; 3] } else { [-4096; 3] }));
        assert!(v.unwrap().rms_g > 27.0);
    }
}
