#!/usr/bin/env python3
"""Generates the recordings of the rule packs in config/recordings/.

Each recording is a small, realistic capture that holds the faults its pack must catch and
stretches where it must stay quiet; agent/tests/rule_packs.rs replays every pack on its
recording and asserts the alerts. The scenario (what happens when) is written out in the
comment lines at the top of each recording and in the test, so the three stay in step:
change a scenario here, regenerate, and update the test's expectations.

Usage: python3 scripts/gen-recordings.py [OUT_DIR]   (default: config/recordings)

Deterministic: python3's standard library only, one seeded generator per recording, so the
same script writes byte-identical files on every machine.
"""

import math
import os
import random
import sys

# 2024-06-10T06:00:00Z: the start of every recording, in seconds since the Unix epoch.
T0 = 1_717_999_200


def clock(seconds):
    """`h:mm:ss` after the start, for the scenario comments."""
    return f"{seconds // 3600}:{seconds % 3600 // 60:02}:{seconds % 60:02}"


def fmt(value, decimals):
    """A reading as the sensor reports it: rounded to its resolution, no `-0.0`."""
    text = f"{value:.{decimals}f}"
    return text.lstrip("-") if float(text) == 0 else text


def write_jsonl(path, header, readings):
    """`# comment` lines, then one {"ts", "series", "value"} object per reading."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in header:
            f.write(f"# {line}\n".replace("# \n", "#\n"))
        for ts, series, value in readings:
            f.write(f'{{"ts":{T0 + ts},"series":"{series}","value":{value}}}\n')


def write_csv(path, header, readings):
    """`# comment` lines, a header row, then `timestamp,series,value` rows."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in header:
            f.write(f"# {line}\n".replace("# \n", "#\n"))
        f.write("timestamp,series,value\n")
        for ts, series, value in readings:
            f.write(f"{T0 + ts},{series},{value}\n")


def ordered(readings):
    """Time order; within one second, the order the series were generated in."""
    return [r for _, r in sorted(enumerate(readings), key=lambda p: (p[1][0], p[0]))]


# --- Pump maintenance --------------------------------------------------------------------------

PUMP_HOURS = 2.5


def pump_maintenance():
    """Two centrifugal pumps (about 15 kW, rigid foundation: ISO 10816-3 group 2). Vibration
    velocity RMS every 10 s, bearing temperature and motor current every 30 s."""
    rng = random.Random(1001)
    end = int(PUMP_HOURS * 3600)
    readings = []

    def load(t):
        # The demand cycle of the plant: 40 minutes, shared by both pumps.
        return math.sin(2 * math.pi * t / 2400)

    for t in range(0, end, 10):
        minutes = t / 60
        # pump-1: a bearing that starts to fail.
        if t % 30 == 0:
            extra = 0.0
            if minutes >= 75:
                # Friction heat: +30 °C towards a plateau, time constant 12 min.
                extra = 30 * (1 - math.exp(-(minutes - 75) / 12))
            temp = 58 + 0.6 * load(t) + extra + rng.gauss(0, 0.12)
            readings.append((t, "pump-1/bearing_temp", fmt(temp, 1)))
        vib, noise = 1.6 + 0.08 * load(t), 0.06
        if minutes >= 40:
            # Defect onset: a step of 0.6 mm/s, still well inside zone B.
            vib, noise = vib + 0.6, 0.09
        if minutes >= 60:
            # The defect grows: +1.8 mm/s over 30 minutes, into zone C.
            vib += 1.8 * min(1.0, (minutes - 60) / 30)
            noise = 0.09 + 0.08 * min(1.0, (minutes - 60) / 30)
        readings.append((t, "pump-1/vibration", fmt(vib + rng.gauss(0, noise), 2)))
        if t % 30 == 0:
            current = 33 + 1.2 * load(t) + rng.gauss(0, 0.25)
            current += 0.08 * extra  # bearing drag
            readings.append((t, "pump-1/motor_current", fmt(current, 1)))

        # pump-2: healthy bearings; a current spike, an overload and a dry run.
        if t % 30 == 0:
            temp = 55 + 0.6 * load(t) + rng.gauss(0, 0.12)
            readings.append((t, "pump-2/bearing_temp", fmt(temp, 1)))
        vib, noise = 1.3 + 0.06 * load(t), 0.05
        if 110 <= minutes < 118:
            # Dry running: cavitation makes the vibration rough and noisy.
            vib, noise = 2.3, 0.45
        readings.append((t, "pump-2/vibration", fmt(max(0.05, vib + rng.gauss(0, noise)), 2)))
        if t % 30 == 0:
            current = 31 + 1.2 * load(t) + rng.gauss(0, 0.25)
            if t in (1500, 1530):
                # A valve slams shut downstream: one minute of surge current.
                current = {1500: 56.0, 1530: 52.0}[t] + rng.gauss(0, 0.3)
            if 60 <= minutes < 85:
                # The discharge valve is opened fully: the pump runs out on its curve.
                ramp = min(1.0, (minutes - 60) / 2) * min(1.0, (85 - minutes) / 2)
                current += 16.0 * ramp
            if 110 <= minutes < 118:
                current = 17 + rng.gauss(0, 0.4)  # lost prime: the impeller spins in air
            readings.append((t, "pump-2/motor_current", fmt(current, 1)))

    header = [
        "Rule pack recording: config/pump-maintenance.toml (generated by scripts/gen-recordings.py)",
        "Two pumps, 2.5 h. Vibration RMS (mm/s) every 10 s; bearing temperature (°C) and motor",
        "current (A) every 30 s. A 40-minute demand cycle moves all of them a little.",
        "",
        "pump-1, a bearing that fails:",
        "  0:00-0:40  healthy: 1.6 mm/s, 58 °C, 33 A                 (quiet)",
        "  0:40       defect onset: vibration steps to 2.2 mm/s      (vibration-anomaly)",
        "  1:00-1:30  vibration grows to 4.0 mm/s                    (vibration-high at ~1:14)",
        "  1:15       bearing heats: +30 °C, time constant 12 min    (bearing-temp-rising ~1:17,",
        "                                                             bearing-temp-high ~1:33,",
        "                                                             bearing-failing with it)",
        "  to 2:30    the failure goes on: only the trend rule clears, at the plateau (~1:44)",
        "pump-2, healthy bearings:",
        "  0:25       surge current 56 A, 52 A for one minute        (quiet)",
        "  1:00-1:25  overload: 47 A                                 (motor-overload)",
        "  1:50-1:58  dry run: 17 A, rough vibration                 (motor-dry-run, vibration-anomaly",
        "                                                             until the detector accepts",
        "                                                             the old normal again, ~2:17)",
    ]
    return header, ordered(readings)


# --- Cold chain --------------------------------------------------------------------------------


def cold_chain():
    """Two upright freezers set to -21.5 °C; air temperature (0.1 °C resolution) and door
    contact (0 closed, 1 open) every 30 s."""
    rng = random.Random(2002)
    end = 6 * 3600
    readings = []
    # Door openings (start, end) in seconds.
    doors = {
        "freezer-1": [(2400, 2520), (5400, 5580), (6000, 6180), (9000, 10800)],
        "freezer-2": [(3 * 3600 + 600, 3 * 3600 + 750)],
    }
    power_off = (5400, 8100)  # freezer-2: the circuit trips at 1:30, back at 2:15
    compressor_fails, repaired = 12600, 17100  # freezer-2: 3:30 and 4:45
    stuck = (16200, 18900)  # freezer-1: the probe sticks at 4:30, freed at 5:15
    state = {name: {"temp": -21.5, "stuck": None} for name in doors}

    for t in range(0, end, 30):
        for name in ("freezer-1", "freezer-2"):
            s = state[name]
            is_open = any(a <= t < b for a, b in doors[name])
            # The compressor cycle: a 36-minute sawtooth of 2.5 °C around the set point.
            phase = (t + (0 if name == "freezer-1" else 700)) % 2160 / 2160
            cycle = -1.25 + 2.5 * (phase / 0.7 if phase < 0.7 else (1 - phase) / 0.3)
            target, tau = -21.5 + cycle, 240.0
            if is_open:
                target, tau = -5.0, 300.0  # warm, humid air rushes in
            if name == "freezer-2" and power_off[0] <= t < power_off[1]:
                # Door shut, no cooling: the cold goods keep the air cold for a long time.
                target, tau = 5.0, 30000.0
            if name == "freezer-2" and compressor_fails <= t < repaired:
                # The evaporator fan still runs: a steady rise of 0.2 °C per minute.
                s["temp"] += 0.1
            else:
                step = (target - s["temp"]) * (1 - math.exp(-30 / tau))
                if name == "freezer-2" and t >= repaired:
                    # Pulling warm goods down again: the compressor's capacity limits the
                    # cooling to 0.4 °C per minute.
                    step = max(step, -0.2)
                s["temp"] += step
            if name == "freezer-2" and power_off[0] <= t < power_off[1]:
                continue  # no power, no logger: nothing is reported
            value = fmt(s["temp"] + rng.gauss(0, 0.06), 1)
            if name == "freezer-1" and stuck[0] <= t < stuck[1]:
                s["stuck"] = s["stuck"] or value
                value = s["stuck"]
            readings.append((t, f"{name}/temperature", value))
            readings.append((t, f"{name}/door", "1" if is_open else "0"))

    header = [
        "Rule pack recording: config/cold-chain.toml (generated by scripts/gen-recordings.py)",
        "Two upright freezers set to -21.5 °C, 6 h. Air temperature (°C, 0.1 resolution) and door",
        "contact (1 = open) every 30 s. The compressor cycles the air by 2.5 °C every 36 min.",
        "",
        "freezer-1:",
        "  0:40       door open 2 min (loading)                      (quiet: door-open tolerance)",
        "  1:30, 1:40 door open 3 min twice (restocking)             (quiet)",
        "  2:30-3:00  door left ajar 30 min                          (door-left-open, freezer-warming,",
        "                                                             freezer-too-warm)",
        "  4:30-5:15  the probe sticks at one reading                (sensor-stuck)",
        "freezer-2:",
        "  1:30-2:15  power cut: the logger is silent for 45 min     (power-loss, from ticks alone)",
        "  3:10       door open 2.5 min                              (quiet)",
        "  3:30-4:45  compressor fails, +0.2 °C/min; then repaired   (freezer-warming, freezer-too-warm)",
    ]
    return header, ordered(readings)


# --- Patient monitoring ------------------------------------------------------------------------


def patient_monitoring():
    """Two bedside monitors sending heart rate (bpm) and SpO2 (%) once a second, as integers."""
    rng = random.Random(3003)
    end = 30 * 60
    readings = []

    def ramp(t, a, b):
        """0 before a, 1 after b, linear between."""
        return min(1.0, max(0.0, (t - a) / (b - a)))

    for bed, hr_base, spo2_base in (("bed-12", 80.0, 96.6), ("bed-14", 64.0, 95.4)):
        hr_noise, spo2_noise = 0.0, 0.0
        held = None
        for t in range(end):
            # Beat-to-beat variation and the oximeter's averaging: first-order autoregressive
            # noise, so the readings wander as real ones do instead of jumping.
            hr_noise = 0.8 * hr_noise + rng.gauss(0, 1.2)
            spo2_noise = 0.9 * spo2_noise + rng.gauss(0, 0.3)
            hr, spo2 = hr_base + hr_noise, spo2_base + spo2_noise
            if bed == "bed-12":
                if 180 <= t < 188:
                    spo2 = 88  # the patient holds their breath: 8 s below 90
                if 300 <= t < 315:
                    hr = 126 + rng.gauss(0, 1)  # coughing: 15 s above 120
                # Desaturation A: 96 to 86 over 30 s, held to 10:00, back by 10:30.
                spo2 -= 10 * (ramp(t, 480, 510) - ramp(t, 600, 630))
                # Episode B: tachycardia from 14:00 to 19:00 with a desaturation inside it.
                hr += 58 * (ramp(t, 840, 900) - ramp(t, 1080, 1140))
                spo2 -= 9 * (ramp(t, 900, 930) - ramp(t, 1020, 1050))
            else:
                # Bradycardia: a vasovagal episode from 11:00 to 12:20.
                hr -= 28 * (ramp(t, 660, 680) - ramp(t, 720, 740))
                if 360 <= t < 370:
                    spo2 = 89  # 10 s dip (the probe moved): below 90 for less than 15 s
                if 1200 < t <= 1290:
                    continue  # the monitor drops off the network for 90 s
            values = (round(hr), min(100, round(spo2)))
            if bed == "bed-12" and 1380 <= t < 1500:
                # The finger probe slips off at 23:00: the monitor holds the last reading
                # for the 2 minutes until a nurse puts it back.
                held = held or prev
                values = held
            elif held is not None and values[0] == held[0]:
                values = (values[0] + 2, values[1])  # the first reading after differs
                held = None
            else:
                held = None
            prev = values
            readings.append((t, f"{bed}/heart_rate", values[0]))
            readings.append((t, f"{bed}/spo2", values[1]))

    header = [
        "Rule pack recording: config/patient-monitoring.toml (generated by scripts/gen-recordings.py)",
        "Two bedside monitors, 30 min, heart rate (bpm) and SpO2 (%) once a second.",
        "",
        "bed-12:",
        "  0:03:00  breath hold: SpO2 88 for 8 s                    (quiet: shorter than 15 s)",
        "  0:05:00  coughing: heart rate 126 for 15 s               (quiet: shorter than 30 s)",
        "  0:08:00  desaturation to 86 % until 0:10:30              (spo2-low, needs-attention)",
        "  0:14:00  tachycardia to 138 bpm until 0:19:00, with a",
        "           desaturation to 87 % from 0:15:00 to 0:17:30     (tachycardia, spo2-low, one",
        "                                                           needs-attention episode)",
        "  0:23:00  finger probe off: the reading is held 2 min     (probe-off, needs-attention)",
        "bed-14:",
        "  0:06:00  probe moved: SpO2 89 for 10 s                   (quiet)",
        "  0:11:00  bradycardia to 36 bpm for 40 s                  (heart-rate-low, needs-attention)",
        "  0:20:00  the monitor drops off the network for 90 s      (monitor-offline, both series)",
        "end        replay advances the clock 65 s past the last reading, so monitor-offline",
        "           raises for every series 30 s after it (see agent/tests/rule_packs.rs)",
    ]
    return header, ordered(readings)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join("config", "recordings")
    os.makedirs(out, exist_ok=True)
    for name, make, write, ext in (
        ("pump-maintenance", pump_maintenance, write_jsonl, "jsonl"),
        ("cold-chain", cold_chain, write_jsonl, "jsonl"),
        ("patient-monitoring", patient_monitoring, write_csv, "csv"),
    ):
        header, readings = make()
        path = os.path.join(out, f"{name}.{ext}")
        write(path, header, readings)
        print(f"{path}: {len(readings)} readings, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
