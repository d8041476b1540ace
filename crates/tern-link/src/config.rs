//! Link settings, their textual forms (`100mbit`, `25ms`, `0.05%`) and the named profiles.

use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// Largest accepted rate: 100 Gbit/s.
pub const MAX_RATE_BPS: u64 = 100_000_000_000;
/// Largest accepted one-way delay or jitter: 10 s.
pub const MAX_DELAY_US: u64 = 10_000_000;
/// Hard bound on a queue limit in packets.
pub const MAX_QUEUE_PACKETS: u32 = 1 << 20;
/// Hard bound on a queue limit in bytes: 1 GiB.
pub const MAX_QUEUE_BYTES: u64 = 1 << 30;
/// Smallest default queue: 100 full-size packets, so that a link with a tiny BDP still
/// absorbs a TCP burst the way a real router port would.
pub const MIN_DEFAULT_QUEUE_BYTES: u64 = 100 * 1500;

/// How random loss is drawn, per packet, before the queue (netem and dummynet do the same).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case")]
pub enum LossModel {
    None,
    /// Independent loss with probability `p`.
    Bernoulli {
        p: f64,
    },
    /// Two-state Markov chain (Gilbert–Elliott): bursts of loss.
    GilbertElliott {
        p_good_to_bad: f64,
        p_bad_to_good: f64,
        loss_in_bad: f64,
        loss_in_good: f64,
    },
}

impl LossModel {
    /// Long-run fraction of packets lost.
    pub fn mean_loss(&self) -> f64 {
        match *self {
            LossModel::None => 0.0,
            LossModel::Bernoulli { p } => p,
            LossModel::GilbertElliott {
                p_good_to_bad,
                p_bad_to_good,
                loss_in_bad,
                loss_in_good,
            } => {
                let denom = p_good_to_bad + p_bad_to_good;
                if denom == 0.0 {
                    return loss_in_good;
                }
                let pi_bad = p_good_to_bad / denom;
                pi_bad * loss_in_bad + (1.0 - pi_bad) * loss_in_good
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let probs: &[f64] = match self {
            LossModel::None => &[],
            LossModel::Bernoulli { p } => &[*p][..],
            LossModel::GilbertElliott {
                p_good_to_bad,
                p_bad_to_good,
                loss_in_bad,
                loss_in_good,
            } => &[*p_good_to_bad, *p_bad_to_good, *loss_in_bad, *loss_in_good][..],
        };
        for &p in probs {
            if !(0.0..=1.0).contains(&p) {
                return Err(ConfigError::OutOfRange {
                    what: "loss probability",
                    value: p.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// Shape of the per-packet jitter added to the one-way delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JitterShape {
    /// Uniform on [-jitter, +jitter] (netem's default shape).
    Uniform,
    /// Normal with standard deviation `jitter`, truncated at ±3 σ.
    Normal,
}

/// Settings of one direction of the link. Every field has a named bound (see `validate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectionConfig {
    /// Serialization rate in bits/s; 0 means unlimited.
    pub rate_bps: u64,
    /// Fixed one-way propagation delay.
    pub delay_us: u64,
    /// Jitter amplitude (see [`JitterShape`]); the total delay never goes below zero.
    pub jitter_us: u64,
    pub jitter_shape: JitterShape,
    /// Let jitter reorder packets. Off by default: a packet never overtakes an earlier one.
    pub reorder: bool,
    pub loss: LossModel,
    /// Drop-tail limit on bytes waiting for or in serialization.
    pub queue_limit_bytes: u64,
    /// Drop-tail limit on packets waiting for or in serialization.
    pub queue_limit_packets: u32,
}

impl DirectionConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.rate_bps > MAX_RATE_BPS {
            return Err(ConfigError::OutOfRange {
                what: "rate",
                value: format!("{} bit/s", self.rate_bps),
            });
        }
        if self.delay_us > MAX_DELAY_US || self.jitter_us > MAX_DELAY_US {
            return Err(ConfigError::OutOfRange {
                what: "delay or jitter",
                value: format!("{} µs", self.delay_us.max(self.jitter_us)),
            });
        }
        if self.queue_limit_packets == 0 || self.queue_limit_packets > MAX_QUEUE_PACKETS {
            return Err(ConfigError::OutOfRange {
                what: "queue limit (packets)",
                value: self.queue_limit_packets.to_string(),
            });
        }
        if self.queue_limit_bytes < 1500 || self.queue_limit_bytes > MAX_QUEUE_BYTES {
            return Err(ConfigError::OutOfRange {
                what: "queue limit (bytes)",
                value: self.queue_limit_bytes.to_string(),
            });
        }
        self.loss.validate()
    }
}

/// A whole link as users describe it: symmetric settings from a round-trip time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkSpec {
    pub rate_bps: u64,
    pub rtt_us: u64,
    pub loss: LossModel,
    pub jitter_us: u64,
    pub jitter_shape: JitterShape,
    pub reorder: bool,
    /// Explicit queue limit in packets; `None` means one bandwidth-delay product.
    pub queue_packets: Option<u32>,
    /// Explicit queue limit in bytes; `None` means one bandwidth-delay product.
    pub queue_bytes: Option<u64>,
}

impl LinkSpec {
    pub fn new(rate_bps: u64, rtt_us: u64, loss_fraction: f64, jitter_us: u64) -> Self {
        let loss = if loss_fraction > 0.0 {
            LossModel::Bernoulli { p: loss_fraction }
        } else {
            LossModel::None
        };
        Self {
            rate_bps,
            rtt_us,
            loss,
            jitter_us,
            jitter_shape: JitterShape::Uniform,
            reorder: false,
            queue_packets: None,
            queue_bytes: None,
        }
    }

    /// Bandwidth-delay product in bytes (0 when rate or RTT is 0).
    pub fn bdp_bytes(&self) -> u64 {
        (u128::from(self.rate_bps) * u128::from(self.rtt_us) / 8 / 1_000_000) as u64
    }

    /// The per-direction settings: half the RTT each way, queue from the explicit limits or
    /// one BDP (at least [`MIN_DEFAULT_QUEUE_BYTES`]).
    pub fn direction(&self) -> DirectionConfig {
        let queue_limit_bytes = match (self.queue_bytes, self.queue_packets) {
            (Some(b), _) => b,
            // A packet limit alone: bytes do not bind first.
            (None, Some(p)) => u64::from(p) * 65_535,
            (None, None) => self.bdp_bytes().max(MIN_DEFAULT_QUEUE_BYTES),
        }
        .min(MAX_QUEUE_BYTES);
        DirectionConfig {
            rate_bps: self.rate_bps,
            delay_us: self.rtt_us / 2,
            jitter_us: self.jitter_us,
            jitter_shape: self.jitter_shape,
            reorder: self.reorder,
            loss: self.loss,
            queue_limit_bytes,
            queue_limit_packets: self.queue_packets.unwrap_or(MAX_QUEUE_PACKETS),
        }
    }
}

/// A named link from the seeds.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub name: &'static str,
    pub rate_bps: u64,
    pub rtt_us: u64,
    /// Random loss in percent.
    pub loss_percent: f64,
    pub jitter_us: u64,
    pub queue_packets: Option<u32>,
    pub about: &'static str,
}

const G: u64 = 1_000_000_000;
const M: u64 = 1_000_000;

/// The profiles of the seed experiments (HyperIP 000/001, the thesis 002, CloudNet and
/// PipeCloud 004). `ll-metro` and `ll-metro-5ms` are the two renderings of one seed row.
pub const PROFILES: &[Profile] = &[
    Profile {
        name: "baseline",
        rate_bps: G,
        rtt_us: 0,
        loss_percent: 0.0,
        jitter_us: 0,
        queue_packets: None,
        about: "unimpaired gigabit LAN",
    },
    Profile {
        name: "sonet",
        rate_bps: G,
        rtt_us: 5_000,
        loss_percent: 0.001,
        jitter_us: 0,
        queue_packets: None,
        about: "HyperIP SONET row",
    },
    Profile {
        name: "ll-metro",
        rate_bps: G,
        rtt_us: 500,
        loss_percent: 0.005,
        jitter_us: 0,
        queue_packets: None,
        about: "HyperIP low-latency metro (0.5 ms rendering)",
    },
    Profile {
        name: "ll-metro-5ms",
        rate_bps: G,
        rtt_us: 5_000,
        loss_percent: 0.005,
        jitter_us: 0,
        queue_packets: None,
        about: "HyperIP low-latency metro (5 ms rendering)",
    },
    Profile {
        name: "metro",
        rate_bps: G,
        rtt_us: 12_000,
        loss_percent: 0.1,
        jitter_us: 0,
        queue_packets: None,
        about: "HyperIP metro row",
    },
    Profile {
        name: "mpls",
        rate_bps: 100 * M,
        rtt_us: 25_000,
        loss_percent: 0.05,
        jitter_us: 3_000,
        queue_packets: None,
        about: "HyperIP MPLS row",
    },
    Profile {
        name: "cloudnet-lab",
        rate_bps: 100 * M,
        rtt_us: 20_000,
        loss_percent: 0.0,
        jitter_us: 0,
        queue_packets: None,
        about: "CloudNet emulated lab link",
    },
    Profile {
        name: "cloudnet-wan",
        rate_bps: 465 * M,
        rtt_us: 27_000,
        loss_percent: 0.0,
        jitter_us: 0,
        queue_packets: None,
        about: "CloudNet Texas-Illinois WAN",
    },
    Profile {
        name: "dr-50",
        rate_bps: G,
        rtt_us: 50_000,
        loss_percent: 0.0,
        jitter_us: 0,
        queue_packets: None,
        about: "PipeCloud 50 ms backup site",
    },
    Profile {
        name: "dr-100",
        rate_bps: G,
        rtt_us: 100_000,
        loss_percent: 0.0,
        jitter_us: 0,
        queue_packets: None,
        about: "PipeCloud 100 ms backup site",
    },
    Profile {
        name: "thesis",
        rate_bps: 100 * M,
        rtt_us: 60_000,
        loss_percent: 0.0,
        jitter_us: 0,
        queue_packets: Some(40),
        about: "ACK-compression thesis dummynet pipe",
    },
];

impl Profile {
    pub fn find(name: &str) -> Result<&'static Profile, ConfigError> {
        PROFILES
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| ConfigError::UnknownProfile {
                name: name.to_string(),
                known: PROFILES
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn spec(&self) -> LinkSpec {
        let mut spec = LinkSpec::new(
            self.rate_bps,
            self.rtt_us,
            self.loss_percent / 100.0,
            self.jitter_us,
        );
        spec.queue_packets = self.queue_packets;
        spec
    }
}

fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

fn parse_f64(what: &'static str, input: &str, num: &str) -> Result<f64, ConfigError> {
    let v: f64 = num.parse().map_err(|_| ConfigError::Malformed {
        what,
        input: input.to_string(),
    })?;
    if !v.is_finite() || v < 0.0 {
        return Err(ConfigError::Malformed {
            what,
            input: input.to_string(),
        });
    }
    Ok(v)
}

/// Parses a rate: `100mbit`, `1gbit`, `465Mbit`, `64kbit`, `1.5gbps`, `1000000` (bits/s).
/// Units are bits per second in every spelling (unlike tc, `bps` is not bytes here).
pub fn parse_rate(input: &str) -> Result<u64, ConfigError> {
    let s = input.trim().to_ascii_lowercase();
    let (num, unit) = split_number(&s);
    let v = parse_f64("rate", input, num)?;
    let mult = match unit {
        "" | "bit" | "bps" | "b" => 1.0,
        "k" | "kbit" | "kbps" | "kb" => 1e3,
        "m" | "mbit" | "mbps" | "mb" => 1e6,
        "g" | "gbit" | "gbps" | "gb" => 1e9,
        _ => {
            return Err(ConfigError::Malformed {
                what: "rate",
                input: input.to_string(),
            });
        }
    };
    let bps = (v * mult).round();
    if bps > MAX_RATE_BPS as f64 {
        return Err(ConfigError::OutOfRange {
            what: "rate",
            value: input.to_string(),
        });
    }
    Ok(bps as u64)
}

/// Parses a duration into microseconds: `25ms`, `0.5ms`, `250us`, `1s`, `0`.
pub fn parse_duration_us(input: &str) -> Result<u64, ConfigError> {
    let s = input.trim().to_ascii_lowercase();
    let (num, unit) = split_number(&s);
    let v = parse_f64("duration", input, num)?;
    let mult = match unit {
        "us" | "µs" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "" if v == 0.0 => 0.0,
        _ => {
            return Err(ConfigError::Malformed {
                what: "duration",
                input: input.to_string(),
            });
        }
    };
    let us = (v * mult).round();
    if us > MAX_DELAY_US as f64 {
        return Err(ConfigError::OutOfRange {
            what: "duration",
            value: input.to_string(),
        });
    }
    Ok(us as u64)
}

/// Parses a percentage into a fraction: `0.05%` → 0.0005. The `%` is required (except
/// for `0`) so that `0.05` cannot be misread as 5%.
pub fn parse_percent(input: &str) -> Result<f64, ConfigError> {
    let s = input.trim();
    let (num, unit) = split_number(s);
    let v = parse_f64("percentage", input, num)?;
    match unit {
        "%" => {}
        "" if v == 0.0 => {}
        _ => {
            return Err(ConfigError::Malformed {
                what: "percentage",
                input: input.to_string(),
            });
        }
    }
    if v > 100.0 {
        return Err(ConfigError::OutOfRange {
            what: "percentage",
            value: input.to_string(),
        });
    }
    Ok(v / 100.0)
}

/// Parses a loss model: `0.05%` (Bernoulli) or `ge:P,R,H[,K]` (Gilbert–Elliott: P = good→bad
/// transition, R = bad→good, H = loss in the bad state (default 100%), K = loss in the good
/// state (default 0%), all percentages).
pub fn parse_loss(input: &str) -> Result<LossModel, ConfigError> {
    let s = input.trim();
    if let Some(rest) = s.strip_prefix("ge:") {
        let parts: Vec<&str> = rest.split(',').collect();
        if !(2..=4).contains(&parts.len()) {
            return Err(ConfigError::Malformed {
                what: "Gilbert-Elliott loss (ge:P,R[,H[,K]])",
                input: input.to_string(),
            });
        }
        let m = LossModel::GilbertElliott {
            p_good_to_bad: parse_percent(parts[0])?,
            p_bad_to_good: parse_percent(parts[1])?,
            loss_in_bad: parts
                .get(2)
                .map(|p| parse_percent(p))
                .transpose()?
                .unwrap_or(1.0),
            loss_in_good: parts
                .get(3)
                .map(|p| parse_percent(p))
                .transpose()?
                .unwrap_or(0.0),
        };
        return Ok(m);
    }
    let p = parse_percent(s)?;
    Ok(if p == 0.0 {
        LossModel::None
    } else {
        LossModel::Bernoulli { p }
    })
}

/// Formats bits/s the way users type them (`100mbit`).
pub fn format_rate(bps: u64) -> String {
    match bps {
        0 => "unlimited".into(),
        b if b % 1_000_000_000 == 0 => format!("{}gbit", b / 1_000_000_000),
        b if b % 1_000_000 == 0 => format!("{}mbit", b / 1_000_000),
        b if b % 1_000 == 0 => format!("{}kbit", b / 1_000),
        b => format!("{b}bit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100mbit").unwrap(), 100_000_000);
        assert_eq!(parse_rate("1Gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("465Mbit").unwrap(), 465_000_000);
        assert_eq!(parse_rate("1.5gbps").unwrap(), 1_500_000_000);
        assert_eq!(parse_rate("64k").unwrap(), 64_000);
        assert_eq!(parse_rate("12345").unwrap(), 12_345);
        for bad in ["", "fast", "10 parsecs", "-5mbit", "1.2.3mbit", "1000gbit"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(format_rate(100_000_000), "100mbit");
    }

    #[test]
    fn durations_and_percentages() {
        assert_eq!(parse_duration_us("25ms").unwrap(), 25_000);
        assert_eq!(parse_duration_us("0.5ms").unwrap(), 500);
        assert_eq!(parse_duration_us("250us").unwrap(), 250);
        assert_eq!(parse_duration_us("1s").unwrap(), 1_000_000);
        assert_eq!(parse_duration_us("0").unwrap(), 0);
        assert!(parse_duration_us("25").is_err());
        assert!(parse_duration_us("11s").is_err());
        assert!((parse_percent("0.05%").unwrap() - 0.0005).abs() < 1e-12);
        assert_eq!(parse_percent("0").unwrap(), 0.0);
        assert!(parse_percent("0.05").is_err());
        assert!(parse_percent("101%").is_err());
        assert!(parse_percent("x%").is_err());
    }

    #[test]
    fn loss_models() {
        assert_eq!(parse_loss("0").unwrap(), LossModel::None);
        assert_eq!(parse_loss("1%").unwrap(), LossModel::Bernoulli { p: 0.01 });
        let ge = parse_loss("ge:1%,25%").unwrap();
        assert!((ge.mean_loss() - 0.01 / 0.26).abs() < 1e-9);
        assert!(parse_loss("ge:1%").is_err());
    }

    #[test]
    fn profiles_and_default_queue() {
        let mpls = Profile::find("mpls").unwrap().spec();
        assert_eq!(mpls.bdp_bytes(), 312_500);
        let d = mpls.direction();
        assert_eq!(d.delay_us, 12_500);
        assert_eq!(d.queue_limit_bytes, 312_500);
        d.validate().unwrap();
        let thesis = Profile::find("thesis").unwrap().spec().direction();
        assert_eq!(thesis.queue_limit_packets, 40);
        assert_eq!(
            Profile::find("baseline")
                .unwrap()
                .spec()
                .direction()
                .queue_limit_bytes,
            MIN_DEFAULT_QUEUE_BYTES
        );
        let err = Profile::find("moon").unwrap_err().to_string();
        assert!(err.contains("moon") && err.contains("mpls"), "{err}");
        for p in PROFILES {
            p.spec().direction().validate().unwrap();
        }
    }
}
