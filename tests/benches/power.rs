//! `just bench` (power part): powerd on the simulated RK3588 board with the
//! shipped board file and its default 1 s control period. A load step from
//! idle to a load that would draw ~47 W against a 20 W budget; reports the
//! time to settle under the budget (in control periods), the overshoot after
//! settling began, the steady-state error, and powerd's own CPU use.
//! `POCKET_BENCH_TRACE=1` prints the power trace.

use pocket_tests::*;
use std::time::Duration;

/// CPU time of every thread of `pid`, from the scheduler's nanosecond
/// counters (finer than the 10 ms ticks of /proc/PID/stat).
fn cpu_seconds(pid: u32) -> f64 {
    let mut total = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            total += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total as f64 / 1e9
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let period = 1.0;
    let budget = 20.0;
    let mut w = World::start();
    let board = SimBoard::rk3588(&w.tmp.path().join("sys"));
    w.start_powerd(
        board.root(),
        &format!(
            "period_ms = {}\nbudget_watts = {budget}",
            (period * 1000.0) as u64
        ),
    );
    w.ctl(&["power", "set", "performance"]).ok();
    let pid = w.powerd.as_ref().unwrap().pid();
    std::thread::sleep(Duration::from_secs(3));

    let cpu0 = cpu_seconds(pid);
    let step_at = board.elapsed();
    board.set_load(Load {
        cpu: 1.0,
        npu: 1.0,
        gpu: 1.0,
    });
    let window = Duration::from_secs(12);
    std::thread::sleep(window);
    let cpu = (cpu_seconds(pid) - cpu0) / window.as_secs_f64();
    let samples = board.samples_since(step_at);
    if std::env::var_os("POCKET_BENCH_TRACE").is_some() {
        for s in samples.iter().step_by(10) {
            eprintln!(
                "{:>8.3} s {:>7.2} W {:>6.1} C",
                (s.at - step_at).as_secs_f64(),
                s.watts,
                s.temp
            );
        }
    }
    let first_over = samples
        .iter()
        .position(|s| s.watts > budget)
        .expect("the load step exceeded the budget");
    let stepped = samples[first_over].at;
    let first_under = first_over
        + samples[first_over..]
            .iter()
            .position(|s| s.watts <= budget)
            .expect("power came under the budget");
    let settle = samples[first_under].at - stepped;
    let overshoot = samples[first_under..]
        .iter()
        .map(|s| (s.watts - budget).max(0.0))
        .fold(0.0, f64::max)
        / budget;
    let tail: Vec<f64> = samples
        .iter()
        .filter(|s| s.at >= step_at + window - Duration::from_secs(4))
        .map(|s| s.watts)
        .collect();
    let mean = tail.iter().sum::<f64>() / tail.len() as f64;
    let uncapped = 1.0 + 20.0 + 15.5 + 10.3;
    println!("power benchmark: simulated RK3588, {budget} W budget, load step to {uncapped:.1} W uncapped, {period} s control period");
    println!("| metric | value | target |");
    println!("|---|---|---|");
    println!(
        "| settle under the budget | {:.2} s = {:.1} periods | within 3 periods |",
        settle.as_secs_f64(),
        settle.as_secs_f64() / period
    );
    println!(
        "| overshoot after settling began | {:.2}% of the budget | under 5% |",
        overshoot * 100.0
    );
    println!(
        "| steady-state error (last 4 s) | {:.1}% under the budget ({mean:.2} W) | |",
        (budget - mean) / budget * 100.0
    );
    println!(
        "| powerd CPU use | {:.3}% of one core | under 0.5% |",
        cpu * 100.0
    );
}
