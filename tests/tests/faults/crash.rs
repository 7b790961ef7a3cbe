//! Crash loop: the agent is killed with SIGKILL again and again while a publisher keeps
//! publishing at QoS 1. The journal acknowledges an event only after its fsync, and record ids
//! make the upstream de-duplicate what a restart sends again, so every acknowledged event must
//! be counted exactly once by the summaries the receiver ends up with.

use std::time::Duration;

use edgewise_tests::rig::{
    Load, Rig, assert_accounted, fault_scale, print_figures, wait_accounted,
};
use edgewise_tests::{expected_summaries, now_ms};

/// SIGKILLs per run at scale 1.
const KILLS: u64 = 20;

/// `[summary] allowed_lateness` in ms: a backlog that builds up while the agent restarts over
/// and over must never make an acknowledged event late (it would not be counted): events are
/// stamped when published, so the agent may lag 3 s behind. With 1 s windows a series then
/// has at most 4 windows open, the agent's limit (`MAX_OPEN_WINDOWS_PER_SERIES`), so none
/// closes early.
const LATENESS_MS: i64 = 3_000;

/// Time from a window's close to the kill, at most: the agent closes windows on its clock
/// tick (100 ms in the tests' config), then writes the summary, snapshots and sends.
const AFTER_CLOSE_MS: i64 = 150;

/// How long to wait before the next kill: every third kill lands just after a window closes
/// (its end plus the lateness, by the agent's clock), to hit the flush, the outbox write, the
/// send or the snapshot; the others after a random 100–700 ms.
fn next_pause(kill: u64) -> Duration {
    if kill % 3 != 2 {
        return Duration::from_millis(fastrand::u64(100..=700));
    }
    let now = now_ms();
    // Windows end on whole seconds; one closes at `end + LATENESS_MS`.
    let mut close = (now - LATENESS_MS).div_euclid(1_000) * 1_000 + 1_000 + LATENESS_MS;
    let at = loop {
        let at = close + fastrand::i64(0..=AFTER_CLOSE_MS);
        if at - now >= 100 {
            break at;
        }
        close += 1_000;
    };
    Duration::from_millis((at - now) as u64)
}

#[test]
fn a_crash_loop_under_qos1_load_loses_and_duplicates_no_acknowledged_event() {
    let kills = KILLS * fault_scale();
    let mut rig = Rig::new("gw-crash-loop");
    rig.config.allowed_lateness = format!("{LATENESS_MS}ms");
    let mut agent = rig.start_agent();

    // 400 events per second over 4 series, stamped when published.
    let load = Load::start(rig.broker.port(), "crash", 4, 20, Duration::from_millis(50), 0);
    let mut pauses = Vec::new();
    for kill in 0..kills {
        let pause = next_pause(kill);
        pauses.push(pause.as_millis());
        std::thread::sleep(pause);
        agent.assert_running(&format!("before kill {kill} (after {pauses:?} ms)"));
        agent.kill9();
        agent.restart();
    }
    let readings = load.stop();
    eprintln!("crash loop: kills after {pauses:?} ms");

    let expected = expected_summaries(&readings, 1_000);
    let accounting = wait_accounted(&rig.receiver, &expected);
    let duplicates_raw = rig.receiver.with(|r| r.duplicates);
    print_figures("crash_loop", kills, &accounting, duplicates_raw);
    assert_accounted(&rig.receiver, &expected, &accounting);
    agent.assert_running("after the last restart");
    let starts = agent.logs().matches("=== start ").count() as u64;
    assert_eq!(starts, 2 * (kills + 1), "one start marker per start in each log");
    rig.keep_if_asked();
}
