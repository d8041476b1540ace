//! # tern-bench — benchmarks that run real tools through the real lab
//!
//! Each benchmark measures side by side in one run and writes `NAME.json` and `NAME.md`
//! under the results directory, with the exact command, the machine and the kernel.
//! Benchmarks check targets and report them; they never fail a build.

pub mod accel;
pub mod chart;
pub mod cloudnet;
pub mod disk;
pub mod dr;
pub mod membuddies;
pub mod mgmt;
pub mod rekey;
pub mod rr;
pub mod sandpiper;
pub mod tools;
pub mod vmotion;
pub mod wan;

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Lab(#[from] tern_lab::LabError),
    #[error("{tool} output could not be read: {detail}")]
    Tool { tool: &'static str, detail: String },
    /// A tool or process ran and did not do its job (exit status, timeout, bad data).
    #[error("{tool}: {detail}")]
    Failed { tool: &'static str, detail: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// An error and its sources on one line ("a: b: c").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Facts about the machine recorded with every result.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub default_congestion_control: String,
}

pub fn machine() -> Machine {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    Machine {
        kernel: read("/proc/sys/kernel/osrelease"),
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        default_congestion_control: read("/proc/sys/net/ipv4/tcp_congestion_control"),
    }
}

/// Writes `name.json` and `name.md` into `dir`.
pub fn write_results(
    dir: &Path,
    name: &str,
    json: &serde_json::Value,
    markdown: &str,
) -> Result<(), BenchError> {
    let io = |what: String| move |source| BenchError::Io { what, source };
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let j = dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(json).unwrap_or_default();
    std::fs::write(&j, text + "\n").map_err(io(format!("write {}", j.display())))?;
    let m = dir.join(format!("{name}.md"));
    std::fs::write(&m, markdown).map_err(io(format!("write {}", m.display())))?;
    Ok(())
}
