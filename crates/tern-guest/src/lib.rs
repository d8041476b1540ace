//! `tern-guest`: the workload inside tern's test guest (see `docs/guest.md`).
//!
//! It runs as the only real process of a tiny Linux guest (busybox init → this binary) and
//! gives live migration something honest to move and something to break:
//!
//! - a **data area** of `--mem-mb` MiB filled with realistic content for one of four
//!   profiles after CloudNet's applications (`idle`, `kernel-compile`, `web-db`,
//!   `java-heap`), modified page by page at `--rate-mbps` ([`workload`], [`content`]);
//! - an **integrity check**: one checksum per 4 KiB record in a separate table, updated
//!   with every write and re-verified in full, pass after pass, by the same thread that
//!   writes, so a check never races a write ([`store`]);
//! - a **TCP service** (echo on 7, `GET /status` on 80) for connection-continuity checks
//!   ([`service`]).
//!
//! Guarantees: content is a pure function of (profile, size, seed, sequence of write
//! times); any single corrupt byte in the area is reported on the serial console as
//! `tern-guest: verify FAIL ...` within one pass; nothing is written faster than the
//! configured rate plus a bounded catch-up ([`workload::Pacer::MAX_BURST_S`]).
//!
//! Serial markers (stdout is the console), one per line:
//!
//! ```text
//! tern-guest: config workload=web-db mem_mb=64 rate_mbps=8 seed=1 verify_interval_ms=1000
//! tern-guest: ready workload=web-db mem_mb=64 ip=198.18.100.10/24
//! tern-guest: verify ok pass=1 records=16384 bytes=67108864
//! tern-guest: verify FAIL pass=7 record=513 offset=2101248 expected=0x... actual=0x...
//! ```

pub mod content;
pub mod kv;
pub mod rng;
pub mod service;
pub mod store;
pub mod workload;

use workload::Profile;

/// Memory left to the guest kernel and the rest of the process when `--mem-mb` is chosen
/// or clamped against `MemAvailable`.
pub const RESERVE_MB: u64 = 16;
/// Upper bound on the data area (the reference guest has 512 MiB).
pub const MAX_MEM_MB: u64 = 64 * 1024;

pub const USAGE: &str =
    "usage: tern-guest [--workload idle|kernel-compile|web-db|java-heap] [--mem-mb N]
                  [--rate-mbps X] [--seed N] [--ip ADDR/LEN] [--verify-interval-ms N]
                  [--http-port N] [--echo-port N] [--inject-corruption-s N]
                  [--kv DEVICE]   (key-value service on port 7070, records on DEVICE)
                  [--frontend HOST:PORT --calls K]
                                  (front-end tier on port 7070: each PUT n becomes K
                                  PUTs n*K..n*K+K-1 to the key-value service at HOST)";

/// Command-line configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub profile: Profile,
    /// `None`: half of `MemAvailable`.
    pub mem_mb: Option<u64>,
    /// MiB/s of pages touched.
    pub rate_mbps: f64,
    pub seed: u64,
    /// Shown in the `ready` marker (the init script passes what it configured).
    pub ip: String,
    pub verify_interval_ms: u64,
    pub http_port: u16,
    pub echo_port: u16,
    /// Flip one byte behind the checksum's back this many seconds after `ready`.
    pub inject_corruption_s: Option<u64>,
    /// Serve the key-value service (`kv.rs`) with its records on this raw disk.
    pub kv_device: Option<String>,
    /// Serve the front-end tier (`kv.rs`): requests become `frontend_calls` PUTs each to
    /// the key-value service at this address.
    pub frontend: Option<String>,
    pub frontend_calls: u32,
}

/// Parses the arguments after the program name; `Ok(None)` for `--help`.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Option<Config>, String> {
    let mut profile = Profile::WebDb;
    let mut mem_mb = None;
    let mut rate_mbps = None;
    let mut seed = 1;
    let mut ip = "none".to_string();
    let mut verify_interval_ms = None;
    let mut http_port = 80;
    let mut echo_port = 7;
    let mut kv_device = None;
    let mut frontend = None;
    let mut frontend_calls = 1;
    let mut inject_corruption_s = None;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        if arg == "--help" || arg == "-h" {
            return Ok(None);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("{flag}: not a valid number: {v:?}"))
        }
        match flag.as_str() {
            "--workload" => {
                let v = value()?;
                profile = Profile::parse(&v).ok_or_else(|| format!("unknown workload {v:?}"))?;
            }
            "--mem-mb" => {
                let v: u64 = num(&flag, value()?)?;
                if v == 0 || v > MAX_MEM_MB {
                    return Err(format!("--mem-mb must be 1..={MAX_MEM_MB}"));
                }
                mem_mb = Some(v);
            }
            "--rate-mbps" => {
                let v: f64 = num(&flag, value()?)?;
                if !(0.0..=10_000.0).contains(&v) {
                    return Err("--rate-mbps must be 0..=10000".to_string());
                }
                rate_mbps = Some(v);
            }
            "--seed" => seed = num(&flag, value()?)?,
            "--ip" => ip = value()?,
            "--verify-interval-ms" => verify_interval_ms = Some(num(&flag, value()?)?),
            "--http-port" => http_port = num(&flag, value()?)?,
            "--echo-port" => echo_port = num(&flag, value()?)?,
            "--inject-corruption-s" => inject_corruption_s = Some(num(&flag, value()?)?),
            "--kv" => kv_device = Some(value()?),
            "--frontend" => frontend = Some(value()?),
            "--calls" => {
                frontend_calls = num(&flag, value()?)?;
                if !(1..=64).contains(&frontend_calls) {
                    return Err("--calls must be 1..=64".to_string());
                }
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(Some(Config {
        profile,
        mem_mb,
        rate_mbps: rate_mbps.unwrap_or(profile.default_rate_mbps()),
        seed,
        ip,
        verify_interval_ms: verify_interval_ms.unwrap_or(profile.default_verify_interval_ms()),
        http_port,
        echo_port,
        inject_corruption_s,
        kv_device,
        frontend,
        frontend_calls,
    }))
}

/// `MemAvailable` in MiB from the text of `/proc/meminfo`.
pub fn mem_available_mb(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The data area size: the request (default: half of what is available), clamped so the
/// guest keeps [`RESERVE_MB`] free. Returns the size and, when clamped, why.
pub fn plan_mem_mb(requested: Option<u64>, available_mb: Option<u64>) -> (u64, Option<String>) {
    let Some(avail) = available_mb else {
        return (requested.unwrap_or(64), None);
    };
    let fits = avail.saturating_sub(RESERVE_MB).max(1);
    match requested {
        None => ((avail / 2).clamp(1, fits), None),
        Some(r) if r > fits => (
            fits,
            Some(format!(
                "mem_mb {r} does not fit (MemAvailable {avail} MiB, reserve {RESERVE_MB} MiB): using {fits}"
            )),
        ),
        Some(r) => (r, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn parses_flags_and_profile_defaults() {
        let c = parse_args(args(
            "--workload java-heap --mem-mb=32 --seed 9 --ip 10.0.0.2/24",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(c.profile, Profile::JavaHeap);
        assert_eq!(c.mem_mb, Some(32));
        assert_eq!(c.seed, 9);
        assert_eq!(c.rate_mbps, 16.0);
        assert_eq!(c.ip, "10.0.0.2/24");
        let d = parse_args(args("--workload idle --rate-mbps 2.5"))
            .unwrap()
            .unwrap();
        assert_eq!((d.rate_mbps, d.verify_interval_ms), (2.5, 5_000));
        assert_eq!(parse_args(args("--help")).unwrap(), None);
        assert!(parse_args(args("--workload nope")).is_err());
        assert!(parse_args(args("--mem-mb 0")).is_err());
        assert!(parse_args(args("--mem-mb")).is_err());
        assert!(parse_args(args("--rate-mbps -1")).is_err());
        assert!(parse_args(args("--bogus 1")).is_err());
    }

    #[test]
    fn memory_plan_defaults_to_half_and_clamps() {
        let meminfo = "MemTotal: 500000 kB\nMemFree: 450000 kB\nMemAvailable: 460800 kB\n";
        assert_eq!(mem_available_mb(meminfo), Some(450));
        assert_eq!(plan_mem_mb(None, Some(450)), (225, None));
        assert_eq!(plan_mem_mb(Some(64), Some(450)), (64, None));
        let (mb, why) = plan_mem_mb(Some(448), Some(450));
        assert_eq!(mb, 450 - RESERVE_MB);
        assert!(why.unwrap().contains("does not fit"));
        assert_eq!(plan_mem_mb(Some(5), None), (5, None));
        assert_eq!(plan_mem_mb(None, Some(10)), (1, None));
    }
}
