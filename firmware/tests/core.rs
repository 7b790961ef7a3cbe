//! The firmware core on the host: scripted sensors, a `Vec<u8>` line, frames decoded with
//! `sensors::frame::Decoder`.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;

use embedded_hal::delay::DelayNs;
use embedded_hal_mock::eh1::delay::NoopDelay;
use firmware::{Aggregate, ConfigError, DynSensor, Firmware, SlotConfig, Stats};
use sensors::frame::{Decoder, Frame, FrameError};
use sensors::reading::{ChannelReading, FaultCode, Quality, Unit};
use sensors::sensor::{Readings, Sensor, SensorError};

/// A driver error carrying the fault code the script asks for.
#[derive(Debug)]
struct ScriptError(FaultCode);

impl SensorError for ScriptError {
    fn fault_code(&self) -> FaultCode {
        self.0
    }
}

/// One scripted read: values per channel, or an error.
type Step = Result<Vec<(f32, Quality)>, FaultCode>;

/// Counters shared with the test after the sensor is lent to the firmware.
#[derive(Default)]
struct Calls {
    inits: Cell<u32>,
    reads: Cell<u32>,
}

/// A sensor that replays a script; with the script exhausted it reads `fallback`.
struct Script<const KIND: u8> {
    reads: VecDeque<Step>,
    inits: VecDeque<Result<(), FaultCode>>,
    fallback: Step,
    calls: Rc<Calls>,
}

impl<const KIND: u8> Script<KIND> {
    fn new(reads: Vec<Step>) -> Self {
        Script {
            reads: reads.into(),
            inits: VecDeque::new(),
            fallback: Err(FaultCode::Timeout),
            calls: Rc::default(),
        }
    }

    fn constant(values: Vec<(f32, Quality)>) -> Self {
        let mut script = Script::new(Vec::new());
        script.fallback = Ok(values);
        script
    }

    fn with_inits(mut self, inits: Vec<Result<(), FaultCode>>) -> Self {
        self.inits = inits.into();
        self
    }
}

/// Two channels (vibration-like) and three channels (power-like).
const TWO: u8 = 2;
const THREE: u8 = 3;

impl<const KIND: u8> Sensor for Script<KIND> {
    type Error = ScriptError;
    const CHANNELS: &'static [Unit] = match KIND {
        TWO => &[Unit::G, Unit::MillimetrePerSecond],
        _ => &[Unit::Milliampere, Unit::Volt, Unit::Watt],
    };

    fn init(&mut self, _delay: &mut impl DelayNs) -> Result<(), ScriptError> {
        self.calls.inits.set(self.calls.inits.get() + 1);
        self.inits.pop_front().unwrap_or(Ok(())).map_err(ScriptError)
    }

    fn read(&mut self, _delay: &mut impl DelayNs) -> Result<Readings, ScriptError> {
        self.calls.reads.set(self.calls.reads.get() + 1);
        let step = self.reads.pop_front().unwrap_or_else(|| self.fallback.clone());
        let values = step.map_err(ScriptError)?;
        Ok(values
            .into_iter()
            .zip(0u8..)
            .map(|((value, quality), channel)| ChannelReading {
                channel,
                unit: Self::CHANNELS[usize::from(channel)],
                value,
                quality,
            })
            .collect())
    }
}

/// A counter with one unitless channel: 0, 1, 2, … per read.
struct Counter(u32);

impl Sensor for Counter {
    type Error = ScriptError;
    const CHANNELS: &'static [Unit] = &[Unit::Unitless];

    fn init(&mut self, _delay: &mut impl DelayNs) -> Result<(), ScriptError> {
        Ok(())
    }

    fn read(&mut self, _delay: &mut impl DelayNs) -> Result<Readings, ScriptError> {
        let value = self.0 as f32;
        self.0 += 1;
        Ok(Readings::from_iter([ChannelReading::good(0, Unit::Unitless, value)]))
    }
}

fn good(values: &[f32]) -> Step {
    Ok(values.iter().map(|&v| (v, Quality::Good)).collect())
}

fn slot(period: u32, per_report: u16, aggregate: &'static [Aggregate], first: u8) -> SlotConfig {
    SlotConfig {
        sample_period_ms: period,
        samples_per_report: per_report,
        aggregate,
        first_channel: first,
    }
}

const LAST: &[Aggregate] = &[Aggregate::Last];

/// Every outcome the decoder yields for `bytes`.
fn decode(bytes: &[u8]) -> Vec<Result<Frame, FrameError>> {
    Decoder::new().push(bytes).collect()
}

/// The good frames in `bytes`; panics on a frame error.
fn frames(bytes: &[u8]) -> Vec<Frame> {
    decode(bytes).into_iter().map(|f| f.expect("every frame decodes")).collect()
}

/// Polls at every tick the firmware asks for, from `now` while the tick is before `until`
/// (wrapping), and returns the tick it stopped at.
fn run<W: embedded_io::Write>(
    fw: &mut Firmware<W>,
    sensors: &mut [&mut dyn DynSensor],
    mut now: u32,
    polls: usize,
) -> u32 {
    for _ in 0..polls {
        now = fw.poll(now, sensors, &mut NoopDelay::new());
    }
    now
}

#[test]
fn blocks_report_exact_rms_max_and_mean() {
    let mut sensor = Script::<THREE>::new(vec![
        good(&[3.0, 1.0, 10.0]),
        good(&[4.0, 7.0, 11.0]),
        good(&[-5.0, 2.0, 12.5]),
        good(&[0.5, -9.0, 0.0]),
        good(&[1.0, 1.0, 1.0]),
        good(&[2.0, 2.0, 2.0]),
        good(&[2.0, 3.0, 3.0]),
        good(&[1.0, 0.0, 4.0]),
    ]);
    const AGG: &[Aggregate] = &[Aggregate::Rms, Aggregate::Max]; // channel 2: Mean by default
    let mut fw = Firmware::new(3, Vec::new(), &[slot(10, 4, AGG, 4)]).unwrap();
    let sensors: &mut [&mut dyn DynSensor] = &mut [&mut sensor];
    fw.start(100, sensors, &mut NoopDelay::new());
    let mut ticks = Vec::new();
    let mut now = 100;
    for _ in 0..8 {
        ticks.push(now);
        now = fw.poll(now, sensors, &mut NoopDelay::new());
    }
    assert_eq!(ticks, [100, 110, 120, 130, 140, 150, 160, 170]);
    let frames = frames(fw.writer_mut());
    assert_eq!(frames.len(), 2);
    let rms = |xs: &[f64]| (xs.iter().map(|x| x * x).sum::<f64>() / xs.len() as f64).sqrt() as f32;
    let mean = |xs: &[f64]| (xs.iter().sum::<f64>() / xs.len() as f64) as f32;
    let want = [
        (130, rms(&[3.0, 4.0, -5.0, 0.5]), 7.0, mean(&[10.0, 11.0, 12.5, 0.0])),
        (170, rms(&[1.0, 2.0, 2.0, 1.0]), 3.0, mean(&[1.0, 2.0, 3.0, 4.0])),
    ];
    for (frame, (tick, r, m, avg)) in frames.iter().zip(want) {
        assert_eq!(frame.device_id, 3);
        assert_eq!(frame.device_tick_ms, tick);
        assert_eq!(
            frame.readings.as_slice(),
            &[
                ChannelReading::good(4, Unit::Milliampere, r),
                ChannelReading::good(5, Unit::Volt, m),
                ChannelReading::good(6, Unit::Watt, avg),
            ]
        );
    }
    assert_eq!(fw.stats().frames_sent, 2);
}

#[test]
fn uncertain_and_faulted_samples_make_the_report_uncertain_or_a_fault() {
    let mut sensor = Script::<TWO>::new(vec![
        Ok(vec![(1.0, Quality::Good), (f32::NAN, Quality::Fault(FaultCode::InvalidData))]),
        Ok(vec![(3.0, Quality::Uncertain), (f32::NAN, Quality::Fault(FaultCode::InvalidData))]),
    ]);
    let mut fw = Firmware::new(1, Vec::new(), &[slot(10, 2, &[], 0)]).unwrap();
    run(&mut fw, &mut [&mut sensor], 0, 2);
    let frames = frames(fw.writer_mut());
    assert_eq!(
        frames[0].readings[0],
        ChannelReading { channel: 0, unit: Unit::G, value: 2.0, quality: Quality::Uncertain }
    );
    let fault = frames[0].readings[1];
    assert_eq!(fault.quality, Quality::Fault(FaultCode::InvalidData));
    assert!(fault.value.is_nan());
    assert_eq!(fw.stats().sensor_faults, 2);
}

#[test]
fn seq_increments_by_one_per_frame_and_wraps() {
    let mut counter = Counter(0);
    let mut fw =
        Firmware::new(9, Vec::new(), &[slot(5, 1, LAST, 0)]).unwrap().with_first_seq(u32::MAX - 1);
    run(&mut fw, &mut [&mut counter], 0, 4);
    let frames = frames(fw.writer_mut());
    let seqs: Vec<u32> = frames.iter().map(|f| f.seq).collect();
    assert_eq!(seqs, [u32::MAX - 1, u32::MAX, 0, 1]);
    let values: Vec<f32> = frames.iter().map(|f| f.readings[0].value).collect();
    assert_eq!(values, [0.0, 1.0, 2.0, 3.0]);
    assert_eq!(fw.seq(), 2);
}

#[test]
fn more_than_eight_readings_are_split_into_frames_with_consecutive_seqs() {
    let mut a = Script::<THREE>::constant(vec![(1.0, Quality::Good); 3]);
    let mut b = Script::<THREE>::constant(vec![(2.0, Quality::Good); 3]);
    let mut c = Script::<THREE>::constant(vec![(3.0, Quality::Good); 3]);
    let slots = [slot(10, 1, &[], 0), slot(10, 1, &[], 4), slot(10, 1, &[], 8)];
    let mut fw = Firmware::new(1, Vec::new(), &slots).unwrap();
    run(&mut fw, &mut [&mut a, &mut b, &mut c], 50, 1);
    let frames = frames(fw.writer_mut());
    assert_eq!(frames.len(), 2);
    assert_eq!((frames[0].seq, frames[1].seq), (0, 1));
    assert!(frames.iter().all(|f| f.device_tick_ms == 50));
    let channels: Vec<(u8, f32)> =
        frames.iter().flat_map(|f| f.readings.iter().map(|r| (r.channel, r.value))).collect();
    assert_eq!(
        channels,
        [(0, 1.0), (1, 1.0), (2, 1.0), (4, 2.0), (5, 2.0), (6, 2.0), (8, 3.0), (9, 3.0), (10, 3.0)]
    );
    assert_eq!(frames[0].readings.len(), 8);
}

#[test]
fn a_failing_sensor_reports_faults_and_is_reinitialised() {
    // Init in start fails; the retry before the first sample succeeds; the first read is a
    // bus error (re-init scheduled), the second read after the re-init is good.
    let mut sensor = Script::<TWO>::new(vec![Err(FaultCode::Bus), good(&[1.0, 2.0])])
        .with_inits(vec![Err(FaultCode::WrongDevice), Ok(()), Ok(())]);
    let calls = sensor.calls.clone();
    let mut fw = Firmware::new(1, Vec::new(), &[slot(10, 1, &[], 0)]).unwrap();
    let sensors: &mut [&mut dyn DynSensor] = &mut [&mut sensor];
    fw.start(0, sensors, &mut NoopDelay::new());
    assert_eq!(calls.inits.get(), 1);
    run(&mut fw, sensors, 0, 1);
    assert_eq!((calls.inits.get(), calls.reads.get()), (2, 1));
    run(&mut fw, sensors, 10, 1);
    assert_eq!((calls.inits.get(), calls.reads.get()), (3, 2));
    let frames = frames(fw.writer_mut());
    assert_eq!(frames.len(), 2);
    for (channel, reading) in frames[0].readings.iter().enumerate() {
        assert_eq!(reading.channel, channel as u8);
        assert_eq!(reading.unit, [Unit::G, Unit::MillimetrePerSecond][channel]);
        assert_eq!(reading.quality, Quality::Fault(FaultCode::Bus));
    }
    assert_eq!(frames[1].readings[1], ChannelReading::good(1, Unit::MillimetrePerSecond, 2.0));
    let stats = fw.stats();
    assert_eq!((stats.sensor_faults, stats.reinits), (1, 2));
}

#[test]
fn a_failed_init_is_the_samples_fault_and_is_retried_every_sample() {
    let mut sensor = Script::<TWO>::new(vec![]).with_inits(vec![
        Err(FaultCode::WrongDevice),
        Err(FaultCode::WrongDevice),
        Err(FaultCode::Bus),
    ]);
    let calls = sensor.calls.clone();
    let mut fw = Firmware::new(1, Vec::new(), &[slot(10, 2, &[], 0)]).unwrap();
    run(&mut fw, &mut [&mut sensor], 0, 2);
    assert_eq!((calls.inits.get(), calls.reads.get()), (3, 0));
    let frames = frames(fw.writer_mut());
    assert_eq!(frames[0].readings[0].quality, Quality::Fault(FaultCode::Bus));
    assert_eq!(
        fw.stats(),
        Stats { frames_sent: 1, sensor_faults: 2, reinits: 2, ..Stats::default() }
    );
}

#[test]
fn a_read_error_other_than_bus_or_timeout_does_not_reinit() {
    let mut sensor = Script::<TWO>::new(vec![Err(FaultCode::InvalidData), good(&[1.0, 1.0])]);
    let calls = sensor.calls.clone();
    let mut fw = Firmware::new(1, Vec::new(), &[slot(10, 1, &[], 0)]).unwrap();
    run(&mut fw, &mut [&mut sensor], 0, 2);
    assert_eq!(calls.inits.get(), 1);
    assert_eq!(fw.stats().reinits, 0);
}

/// A line that fails the writes whose index (0-based, per `write` call that starts a frame
/// or 0x00) is listed, or returns `Ok(0)` for them.
struct FlakyLine {
    bytes: Vec<u8>,
    writes: usize,
    fail: Vec<usize>,
    zero: bool,
    /// Bytes of the failing write that still reach the line (a partial frame).
    partial: usize,
}

impl embedded_io::ErrorType for FlakyLine {
    type Error = embedded_io::ErrorKind;
}

impl embedded_io::Write for FlakyLine {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        let index = self.writes;
        self.writes += 1;
        if self.fail.contains(&index) {
            self.bytes.extend_from_slice(&buf[..self.partial.min(buf.len())]);
            return if self.zero { Ok(0) } else { Err(embedded_io::ErrorKind::Other) };
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

#[test]
fn a_failed_write_drops_the_frame_and_the_next_one_still_decodes() {
    for zero in [false, true] {
        // Write 0 is start's 0x00; writes 1, 2 are frames 0, 1; write 3 fails (frame 2; on an
        // error 5 of its bytes reached the line); write 4 is the resync 0x00, write 5 frame 3.
        let partial = if zero { 0 } else { 5 };
        let line = FlakyLine { bytes: Vec::new(), writes: 0, fail: vec![3], zero, partial };
        let mut counter = Counter(0);
        let mut fw = Firmware::new(1, line, &[slot(10, 1, LAST, 0)]).unwrap();
        run(&mut fw, &mut [&mut counter], 0, 4);
        assert_eq!(fw.stats().frames_sent, 3);
        assert_eq!(fw.stats().frames_dropped, 1);
        let line = fw.into_writer();
        assert_eq!(line.writes, 6);
        let outcomes = decode(&line.bytes);
        let seqs: Vec<Result<u32, ()>> =
            outcomes.iter().map(|o| o.as_ref().map(|f| f.seq).map_err(|_| ())).collect();
        // A partial frame 2 ends at the resync 0x00: one error, then frame 3 decodes.
        let want =
            if zero { vec![Ok(0), Ok(1), Ok(3)] } else { vec![Ok(0), Ok(1), Err(()), Ok(3)] };
        assert_eq!(seqs, want, "zero = {zero}");
    }
}

#[test]
fn a_line_that_always_fails_never_panics_and_counts_every_frame() {
    let line = FlakyLine {
        bytes: Vec::new(),
        writes: 0,
        fail: (0..100).collect(),
        zero: true,
        partial: 0,
    };
    let mut counter = Counter(0);
    let mut fw = Firmware::new(1, line, &[slot(10, 1, LAST, 0)]).unwrap();
    run(&mut fw, &mut [&mut counter], 0, 10);
    assert_eq!(fw.stats().frames_dropped, 10);
    assert_eq!(fw.seq(), 10);
}

#[test]
fn ticks_wrap_around_u32_max_without_skipping() {
    let mut counter = Counter(0);
    let mut fw = Firmware::new(1, Vec::new(), &[slot(10, 1, LAST, 0)]).unwrap();
    let start = u32::MAX - 25;
    let sensors: &mut [&mut dyn DynSensor] = &mut [&mut counter];
    let mut now = start;
    let mut ticks = Vec::new();
    for _ in 0..6 {
        ticks.push(now);
        now = fw.poll(now, sensors, &mut NoopDelay::new());
    }
    assert_eq!(ticks, [u32::MAX - 25, u32::MAX - 15, u32::MAX - 5, 4, 14, 24]);
    let frames = frames(fw.writer_mut());
    let got: Vec<(u32, f32)> =
        frames.iter().map(|f| (f.device_tick_ms, f.readings[0].value)).collect();
    assert_eq!(got.len(), 6);
    assert_eq!(got[3], (4, 3.0));
    assert_eq!(fw.stats().samples_skipped, 0);
    // A poll just before the wrap-around due tick samples nothing.
    let before = fw.poll(now.wrapping_sub(1), sensors, &mut NoopDelay::new());
    assert_eq!(before, now);
    assert_eq!(fw.stats().frames_sent, 6);
}

#[test]
fn a_long_stall_skips_the_missed_samples_instead_of_bursting() {
    let mut counter = Counter(0);
    let mut fw = Firmware::new(1, Vec::new(), &[slot(10, 1, LAST, 0)]).unwrap();
    let sensors: &mut [&mut dyn DynSensor] = &mut [&mut counter];
    assert_eq!(fw.poll(0, sensors, &mut NoopDelay::new()), 10);
    // Due at 10; polled at 95: one sample now, 20..=90 (8 grid points) skipped, next at 100.
    assert_eq!(fw.poll(95, sensors, &mut NoopDelay::new()), 100);
    assert_eq!(fw.stats().samples_skipped, 8);
    // Polling again before 100 samples nothing.
    assert_eq!(fw.poll(99, sensors, &mut NoopDelay::new()), 100);
    // The same across the wrap: due at u32::MAX - 4 + 10, polled 1000 ms late.
    let mut fw = Firmware::new(1, Vec::new(), &[slot(10, 1, LAST, 0)]).unwrap();
    let sensors: &mut [&mut dyn DynSensor] = &mut [&mut counter];
    let next = fw.poll(u32::MAX - 4, sensors, &mut NoopDelay::new());
    assert_eq!(next, 5);
    assert_eq!(fw.poll(1_005, sensors, &mut NoopDelay::new()), 1_015);
    assert_eq!(fw.stats().samples_skipped, 100);
    assert_eq!(frames(fw.writer_mut()).len(), 2);
}

#[test]
fn slots_keep_their_own_periods_and_the_earliest_due_tick_is_returned() {
    let mut fast = Counter(0);
    let mut slow = Script::<TWO>::constant(vec![(1.0, Quality::Good); 2]);
    let slots = [slot(3, 1, LAST, 0), slot(7, 2, &[], 4)];
    let mut fw = Firmware::new(1, Vec::new(), &slots).unwrap();
    let sensors: &mut [&mut dyn DynSensor] = &mut [&mut fast, &mut slow];
    let mut now = 0;
    let mut ticks = Vec::new();
    while now <= 14 {
        ticks.push(now);
        now = fw.poll(now, sensors, &mut NoopDelay::new());
    }
    assert_eq!(ticks, [0, 3, 6, 7, 9, 12, 14]);
    let frames = frames(fw.writer_mut());
    // The slow slot reports at 7 (samples at 0 and 7) and at 21 (not yet); the fast one each
    // time it is sampled: 0, 3, 6, 9, 12 (7 and 14 are the slow slot's alone).
    let per_tick: Vec<(u32, Vec<u8>)> = frames
        .iter()
        .map(|f| (f.device_tick_ms, f.readings.iter().map(|r| r.channel).collect()))
        .collect();
    assert_eq!(
        per_tick,
        [(0, vec![0]), (3, vec![0]), (6, vec![0]), (7, vec![4, 5]), (9, vec![0]), (12, vec![0])]
    );
}

#[test]
fn a_slot_without_a_sensor_is_skipped_not_polled_in_a_loop() {
    let mut counter = Counter(0);
    let slots = [slot(10, 1, LAST, 0), slot(10, 1, LAST, 4)];
    let mut fw = Firmware::new(1, Vec::new(), &slots).unwrap();
    let now = run(&mut fw, &mut [&mut counter], 0, 3);
    assert_eq!(now, 30);
    assert_eq!(fw.stats().samples_skipped, 3);
    assert_eq!(fw.stats().frames_sent, 3);
}

#[test]
fn start_writes_a_delimiter_first() {
    let mut counter = Counter(0);
    let mut fw = Firmware::new(1, Vec::new(), &[slot(10, 1, LAST, 0)]).unwrap();
    fw.start(0, &mut [&mut counter], &mut NoopDelay::new());
    assert_eq!(fw.writer_mut().as_slice(), &[0]);
}

#[test]
fn bad_configurations_are_refused_with_a_reason() {
    let ok = slot(10, 1, &[], 0);
    let new = |slots: &[SlotConfig]| Firmware::new(1, Vec::<u8>::new(), slots).err();
    let cases: Vec<(Vec<SlotConfig>, ConfigError, &str)> = vec![
        (vec![], ConfigError::NoSlots, "no slot configured"),
        (
            (0..9).map(|i| slot(10, 1, &[], i * 4)).collect(),
            ConfigError::TooManySlots { count: 9 },
            "9 slots configured, at most 8 are supported",
        ),
        (
            vec![ok, slot(0, 1, &[], 4)],
            ConfigError::ZeroPeriod { slot: 1 },
            "slot 1: sample_period_ms must be at least 1",
        ),
        (
            vec![slot(86_400_001, 1, &[], 0)],
            ConfigError::PeriodTooLong { slot: 0, period_ms: 86_400_001 },
            "slot 0: sample_period_ms 86400001 exceeds the maximum of 86400000",
        ),
        (
            vec![slot(10, 0, &[], 0)],
            ConfigError::ZeroSamplesPerReport { slot: 0 },
            "slot 0: samples_per_report must be at least 1",
        ),
        (
            vec![slot(10, 1, &[Aggregate::Min; 5], 0)],
            ConfigError::TooManyAggregates { slot: 0, count: 5 },
            "slot 0: 5 aggregates listed, a sensor has at most 4 channels",
        ),
        (
            vec![slot(10, 1, &[], 253)],
            ConfigError::ChannelOutOfRange { slot: 0, first_channel: 253 },
            "slot 0: channels 253..257 run past channel 255",
        ),
        (
            vec![ok, slot(10, 1, &[], 8), slot(10, 1, &[], 3)],
            ConfigError::ChannelCollision { slot: 0, other: 2 },
            "slots 0 and 2 overlap: each slot owns 4 channels from its first_channel",
        ),
    ];
    for (slots, error, text) in cases {
        assert_eq!(new(&slots), Some(error));
        assert_eq!(error.to_string(), text);
    }
    assert!(new(&[ok, slot(10, 1, &[], 4), slot(10, 1, &[], 252)]).is_none());
    assert!(new(&[slot(86_400_000, u16::MAX, &[Aggregate::Rms; 4], 0)]).is_none());
}

#[test]
fn a_real_ina219_on_a_failing_bus_reports_bus_faults() {
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};
    use sensors::drivers::ina219::{ADDRESS_DEFAULT, Ina219, Shunt};

    // Init writes the reset bit first (datasheet: config register 0x00 = 0x8000); the bus
    // refuses it in start and again in the retry before the first sample.
    let reset = || T::write(0x40, vec![0x00, 0x80, 0x00]).with_error(ErrorKind::Other);
    let mut i2c = Mock::new(&[reset(), reset()]);
    let shunt = Shunt { resistance_milliohm: 100, max_current_ma: 2_000 };
    let mut ina = Ina219::new(i2c.clone(), ADDRESS_DEFAULT, shunt);
    let mut fw = Firmware::new(4, Vec::new(), &[slot(100, 1, &[], 8)]).unwrap();
    run(&mut fw, &mut [&mut ina], 0, 1);
    let frames = frames(fw.writer_mut());
    assert_eq!(frames.len(), 1);
    let got: Vec<(u8, Unit, Quality)> =
        frames[0].readings.iter().map(|r| (r.channel, r.unit, r.quality)).collect();
    let bus = Quality::Fault(FaultCode::Bus);
    assert_eq!(got, [(8, Unit::Milliampere, bus), (9, Unit::Volt, bus), (10, Unit::Watt, bus)]);
    assert_eq!(fw.stats().reinits, 1);
    ina.release();
    i2c.done();
}

#[test]
fn dyn_sensor_forwards_to_the_sensor() {
    let mut sensor = Script::<THREE>::new(vec![good(&[1.0, 2.0, 3.0]), Err(FaultCode::Timeout)])
        .with_inits(vec![Err(FaultCode::WrongDevice)]);
    let dynamic: &mut dyn DynSensor = &mut sensor;
    assert_eq!(dynamic.channels(), &[Unit::Milliampere, Unit::Volt, Unit::Watt]);
    let mut delay = NoopDelay::new();
    assert_eq!(dynamic.init(&mut delay), Err(FaultCode::WrongDevice));
    assert_eq!(dynamic.read(&mut delay).unwrap()[2], ChannelReading::good(2, Unit::Watt, 3.0));
    assert_eq!(dynamic.read(&mut delay), Err(FaultCode::Timeout));
}
