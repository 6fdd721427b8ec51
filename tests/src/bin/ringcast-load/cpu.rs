//! CPU time of processes, user and kernel, from `/proc/<pid>/stat`: what a measured phase
//! cost the machine, and how much of it the kernel spent (socket writes and reads, wake-ups,
//! TCP handshakes). The kernel's time per delivery or per connection, measured against the
//! bare broadcaster, is the floor no server on this machine gets under.

use serde_json::{Value, json};

/// `/proc/<pid>/stat` counts in USER_HZ ticks, 100 per second on Linux.
const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds a process has used so far, all threads together.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Times {
    pub user_s: f64,
    pub sys_s: f64,
}

/// `utime` and `stime` (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name
/// (field 2) is in parentheses and may hold spaces and parentheses itself, so fields are
/// counted from the last `)`.
pub fn parse_stat(stat: &str) -> Option<Times> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let ticks = |f: Option<&str>| f?.parse::<u64>().ok();
    let user = ticks(fields.next())?;
    let sys = ticks(fields.next())?;
    Some(Times {
        user_s: user as f64 / TICKS_PER_SEC,
        sys_s: sys as f64 / TICKS_PER_SEC,
    })
}

/// The CPU time of `pid` so far; `None` once it has exited.
pub fn of(pid: u32) -> Option<Times> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// A named process whose CPU time a workload reports (`--watch name=pid`).
#[derive(Clone, Debug, PartialEq)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
}

/// Parses one `name=pid` of `--watch`.
pub fn parse_watched(s: &str) -> Result<Watched, String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected name=pid"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("`{s}`: `{pid}` is not a process id"))?;
    if name.is_empty() {
        return Err(format!("`{s}`: the name is empty"));
    }
    Ok(Watched {
        name: name.to_owned(),
        pid,
    })
}

/// The CPU times of a set of processes at one moment.
#[derive(Debug)]
pub struct Sample(Vec<(Watched, Option<Times>)>);

/// Samples `procs` now.
pub fn sample(procs: &[Watched]) -> Sample {
    Sample(procs.iter().map(|w| (w.clone(), of(w.pid))).collect())
}

/// The CPU time a set of processes used over a phase: each one's, and the total.
#[derive(Debug)]
pub struct Used {
    procs: Vec<(Watched, Times)>,
    total: Times,
}

impl Used {
    /// Microseconds of user and of kernel time per unit of work (a delivery, a connection).
    pub fn micros_per(&self, units: u64) -> (f64, f64) {
        let per = |seconds: f64| seconds * 1e6 / units.max(1) as f64;
        (per(self.total.user_s), per(self.total.sys_s))
    }

    /// `{"procs": [{"name", "pid", "user_s", "sys_s"}], "user_s", "sys_s"}`.
    pub fn json(&self) -> Value {
        let procs: Vec<Value> = self
            .procs
            .iter()
            .map(|(w, t)| json!({"name": w.name, "pid": w.pid, "user_s": t.user_s, "sys_s": t.sys_s}))
            .collect();
        json!({"procs": procs, "user_s": self.total.user_s, "sys_s": self.total.sys_s})
    }
}

/// What each process used between `before` and `after` (processes of `before`). A process
/// that exited in between is left out.
pub fn used(before: &Sample, after: &Sample) -> Used {
    let mut procs = Vec::new();
    let mut total = Times::default();
    for ((w, b), (_, a)) in before.0.iter().zip(&after.0) {
        let (Some(b), Some(a)) = (b, a) else { continue };
        let spent = Times {
            user_s: a.user_s - b.user_s,
            sys_s: a.sys_s - b.sys_s,
        };
        total.user_s += spent.user_s;
        total.sys_s += spent.sys_s;
        procs.push((w.clone(), spent));
    }
    Used { procs, total }
}

/// This process, named `generator`, followed by `watched`.
pub fn with_generator(watched: &[Watched]) -> Vec<Watched> {
    let mut all = vec![Watched {
        name: "generator".into(),
        pid: std::process::id(),
    }];
    all.extend_from_slice(watched);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line =
            "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 75 0 0 20 0 3 0 1000 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Times {
                user_s: 2.5,
                sys_s: 0.75
            })
        );
        assert_eq!(parse_stat("4242 (short) S 1 2"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn this_process_counts_the_cpu_it_burns() {
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while of(std::process::id()).expect("own stat").user_s == 0.0 {
            assert!(
                start.elapsed().as_secs() < 5,
                "no user time after 5 s of spinning"
            );
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
    }

    #[test]
    fn watch_entries_name_what_is_wrong() {
        assert_eq!(
            parse_watched("gateway=12"),
            Ok(Watched {
                name: "gateway".into(),
                pid: 12
            })
        );
        assert!(parse_watched("gateway").unwrap_err().contains("name=pid"));
        assert!(parse_watched("gateway=x").unwrap_err().contains("`x`"));
        assert!(parse_watched("=12").unwrap_err().contains("empty"));
    }

    #[test]
    fn used_is_the_difference_and_skips_exited_processes() {
        let w = |name: &str, pid| Watched {
            name: name.into(),
            pid,
        };
        let t = |user_s, sys_s| Some(Times { user_s, sys_s });
        let before = Sample(vec![(w("a", 1), t(1.0, 2.0)), (w("b", 2), t(0.5, 0.5))]);
        let after = Sample(vec![(w("a", 1), t(1.5, 3.0)), (w("b", 2), None)]);
        let u = used(&before, &after).json();
        assert_eq!(u["user_s"], 0.5);
        assert_eq!(u["sys_s"], 1.0);
        assert_eq!(u["procs"].as_array().unwrap().len(), 1);
        assert_eq!(u["procs"][0]["name"], "a");
    }
}
