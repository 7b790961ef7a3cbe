//! The firmware core of edgewise devices: sample sensors on a schedule, aggregate, frame, and
//! write to a serial line. `#![no_std]`, no allocation, no panics; generic over embedded-hal
//! 1.0 ([`DelayNs`](embedded_hal::delay::DelayNs)) and [`embedded_io::Write`] (the UART), so
//! the same code runs on a microcontroller and, in `firmware-sim`, on a host.
//!
//! # Data path
//!
//! ```text
//!            every sample_period_ms                       every samples_per_report samples
//! sensor ──init/read──▶ Slot (one per sensor) ──report per channel──┐
//! sensor ──init/read──▶ Slot                  ──report per channel──┤ readings completed in
//!   ⋮                                                                │ this poll
//!                                                                    ▼
//!                         Frame{device_id, seq, tick, ≤ 8 readings} × ⌈n / 8⌉
//!                                         │ sensors::frame::encode (≤ 87 bytes, on the stack)
//!                                         ▼
//!                           [0x00 if the last write failed] ‖ COBS frame ‖ 0x00 ──▶ writer
//! ```
//!
//! - [`sensor`]: [`DynSensor`], so sensors of different types sit in one
//!   `&mut [&mut dyn DynSensor]`; every [`sensors::sensor::Sensor`] is one.
//! - [`slot`]: [`SlotConfig`] and [`Aggregate`]; one slot's schedule and block aggregation.
//! - [`firmware`]: [`Firmware`], which runs the slots and writes the frames; [`Stats`].
//!
//! # Schedule
//!
//! Each slot samples on its own grid: `start(t0)` makes the first sample due at `t0`, then
//! every `sample_period_ms`. [`Firmware::poll`] samples every slot that is due and returns the
//! tick of the earliest next sample; the caller sleeps until then. If the caller comes more
//! than a period late (a long interrupt, a debugger stop), the slot takes one sample and skips
//! the grid points it missed, counted in [`Stats::samples_skipped`]: a burst of back-to-back
//! samples would measure nothing new and delay every other slot. The grid itself does not
//! drift: the next sample is due on the next grid point after `now`.
//!
//! ```text
//! period 10, started at 0:  0   10   20   30   40   50
//! polls at:                 0   10      23               47   50
//! samples:                  ✓   ✓       ✓ (3 late)       ✓ (for 40; 30 skipped, counted)
//!                                                             ✓ (50: back on the grid)
//! ```
//!
//! # Aggregation
//!
//! A block is `samples_per_report` samples of one slot. Per channel, good and uncertain
//! samples are aggregated with the channel's [`Aggregate`] (mean, RMS, max, min, last; sums in
//! f64). The report is
//!
//! - `Good` if every sample of the block was good,
//! - `Uncertain` if at least one sample was aggregated but any was uncertain or faulted,
//! - a fault reading with the block's last fault code if no sample could be aggregated.
//!
//! A value that is not finite counts as an `InvalidData` fault. Report channel numbers are
//! `first_channel + sensor channel`; each slot owns [`sensors::sensor::MAX_CHANNELS`] frame
//! channels from its `first_channel`, and [`Firmware::new`] refuses overlapping blocks.
//!
//! # Framing
//!
//! All reports completed by one poll go out at once, in frames of at most
//! [`sensors::frame::MAX_CHANNELS`] readings; each frame takes the next seq (wrapping), and its
//! tick is the poll's `now`. A frame is encoded into a stack buffer of
//! [`sensors::frame::MAX_FRAME_SIZE`] bytes and written in a loop of `write` calls (not
//! `write_all`, which panics on `Ok(0)`). The core does not call `flush`: a buffered writer
//! should be flushed by the caller after `poll`.
//!
//! # Faults
//!
//! The firmware never halts on a fault; everything is a reading or a counter.
//!
//! | event | effect |
//! |---|---|
//! | init fails (in `start` or later) | sample is a fault with the init's code; init retried before the next sample ([`Stats::reinits`]) |
//! | read fails with `Bus` or `Timeout` | fault for every channel; the chip may have reset: re-init before the next sample |
//! | read fails otherwise, or a channel faults | fault readings; no re-init ([`Stats::sensor_faults`] counts faulted samples) |
//! | a write fails (error or `Ok(0)`) | that frame is dropped, its seq stays consumed (the receiver counts a lost frame, [`Stats::frames_dropped`]); the next frame is preceded by a 0x00 so that the receiver resynchronises |
//!
//! [`Firmware::start`] writes one 0x00 before anything else, so that a partial frame left on
//! the line by a reset is not glued to the first frame.
//!
//! # Ticks
//!
//! Ticks are `u32` milliseconds of uptime and wrap after about 49.7 days. All comparisons are
//! wrapping: a tick is due when `now − due` (wrapping) is below 2^31. Periods are bounded by
//! [`MAX_PERIOD_MS`] (one day), so this holds as long as the caller polls at least every
//! 24 days. The receiver uses the tick only to detect restarts (it went backwards), so the
//! wrap looks like one restart to it.
//!
//! # A main loop on a microcontroller
//!
//! The writer is embedded-io 0.7 (the current release). A HAL whose UART still implements
//! embedded-io 0.6 needs a newtype that forwards `write` and `flush`; the traits' methods are
//! the same.
//!
//! ```text
//! // Sketch for an STM32 with blocking drivers (names as in embassy-stm32); any HAL with
//! // embedded-hal 1.0 I2C and delay plus an embedded-io UART fits the same way.
//! use firmware::{Aggregate, DynSensor, Firmware, SlotConfig};
//! use sensors::drivers::{adxl345::Adxl345, bme280::Bme280};
//!
//! const SLOTS: [SlotConfig; 2] = [
//!     // Environment: sample every 2.5 s, report the mean of 4 every 10 s.
//!     SlotConfig { sample_period_ms: 2_500, samples_per_report: 4, aggregate: &[], first_channel: 0 },
//!     // Vibration: sample every 100 ms, report RMS and max over 1 s.
//!     SlotConfig {
//!         sample_period_ms: 100,
//!         samples_per_report: 10,
//!         aggregate: &[Aggregate::Rms, Aggregate::Max],
//!         first_channel: 4,
//!     },
//! ];
//!
//! #[entry]
//! fn main() -> ! {
//!     let p = embassy_stm32::init(Default::default());
//!     let uart = Uart::new_blocking(p.USART2, p.PA3, p.PA2, Default::default()).unwrap();
//!     let bus = RefCell::new(I2c::new_blocking(p.I2C1, p.PB8, p.PB9, Hertz(400_000), Default::default()));
//!     let mut env = Bme280::new(RefCellDevice::new(&bus), 0x76);
//!     let mut vib = Adxl345::new(RefCellDevice::new(&bus), 0x53);
//!     let mut delay = Delay;
//!     let mut firmware = Firmware::new(DEVICE_ID, uart, &SLOTS).unwrap(); // const config
//!     let sensors: &mut [&mut dyn DynSensor] = &mut [&mut env, &mut vib];
//!     firmware.start(uptime_ms(), sensors, &mut delay);
//!     loop {
//!         let next = firmware.poll(uptime_ms(), sensors, &mut delay);
//!         sleep_until(next); // e.g. an RTC wake-up alarm, then WFI
//!     }
//! }
//! ```
#![no_std]

#[cfg(test)]
extern crate std;

pub mod firmware;
pub mod sensor;
pub mod slot;

pub use firmware::{ConfigError, Firmware, MAX_PERIOD_MS, MAX_SLOTS, Stats};
pub use sensor::DynSensor;
pub use slot::{Aggregate, SlotConfig};
