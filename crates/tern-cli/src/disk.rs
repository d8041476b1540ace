//! `tern disk`: volumes, their NBD server and replication (see `docs/disk.md`).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use tern_disk::Mode;
use tern_disk::server::{self, Role, ServeOptions, Target};
use tern_disk::volume;

#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// Create an empty sparse raw volume (optionally with an ext4 filesystem, filled from a
    /// directory).
    Create {
        path: PathBuf,
        /// Size, e.g. 2G or 512M (a multiple of 4 KiB).
        #[arg(long)]
        size: String,
        /// Make an ext4 filesystem on it (mkfs.ext4).
        #[arg(long)]
        mkfs: bool,
        /// With --mkfs: copy this directory's files into the new filesystem (mkfs.ext4 -d).
        #[arg(long, requires = "mkfs")]
        populate: Option<PathBuf>,
    },
    /// Import any image qemu-img reads (qcow2, vmdk, raw) as a sparse raw volume.
    Import { src: PathBuf, path: PathBuf },
    /// Export a volume with qemu-img (default qcow2).
    Export {
        path: PathBuf,
        dst: PathBuf,
        #[arg(long, default_value = "qcow2")]
        format: String,
    },
    /// Size, allocation, data/zero blocks, content digest and replication state.
    Info {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Compare two volumes by content (64 KiB block hashes); exit 1 when they differ.
    Verify {
        a: PathBuf,
        b: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Serve a volume over NBD (foreground) as a primary (replicating when given a target)
    /// or as a secondary (receiving on --listen).
    Serve(Box<ServeArgs>),
    /// Talk to a running server's control socket:
    /// `status`, `mode async|sync|auto`, `replicate NODE PEER TARGET [MODE]`,
    /// `stop-replication`, `promote [--force]` (force: cut a running session first; a
    /// secondary's write log is applied, what waits on another tier's lost writes dropped),
    /// `gate on|off`, `shutdown`.
    Ctl {
        /// The server's control socket.
        control: PathBuf,
        #[arg(required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    volume: PathBuf,
    /// Unix socket QEMU connects to (nbd+unix:///EXPORT?socket=PATH).
    #[arg(long)]
    nbd: PathBuf,
    /// Control socket (JSON lines; `tern disk ctl`).
    #[arg(long)]
    control: PathBuf,
    #[arg(long, default_value = tern_disk::daemon::EXPORT)]
    export: String,
    /// Serve as a secondary: NBD writes are refused until `promote`.
    #[arg(long, requires = "listen")]
    secondary: bool,
    /// Secondary: the socket the relayed replication stream connects to.
    #[arg(long)]
    listen: Option<PathBuf>,
    /// Primary: replicate through this site node's relay socket...
    #[arg(long, requires_all = ["peer", "target"], conflicts_with = "secondary")]
    node: Option<PathBuf>,
    /// ...to this peer (e.g. site-b)...
    #[arg(long)]
    peer: Option<String>,
    /// ...whose secondary listens here (relative to the far node's migration directory).
    #[arg(long)]
    target: Option<String>,
    /// async: ack after the local write; sync: after the secondary's; auto: async until
    /// the initial sync is acknowledged, then sync.
    #[arg(long, default_value = "auto")]
    mode: Mode,
    /// Cap the initial sync's read rate, MB/s (0: no cap; the transport paces the link).
    #[arg(long, default_value_t = 0)]
    sync_rate: u64,
    /// PipeCloud gating: QEMU's NIC connects here (instead of the site switch) and the
    /// VM's outbound frames wait until the writes before them are committed at the
    /// secondary. Needs --switch.
    #[arg(long, requires = "switch")]
    gate_nic: Option<PathBuf>,
    /// With --gate-nic: the site switch socket the frames go on to.
    #[arg(long)]
    switch: Option<PathBuf>,
    /// With --gate-nic: the VM's MAC (its entry in the clocks it sends peers).
    #[arg(long, value_parser = tern_disk::daemon::parse_mac, requires = "gate_nic")]
    gate_mac: Option<[u8; 6]>,
    /// With --gate-nic: another gated tier of the VM's protected group, as MAC=PATH of
    /// that tier's disk-counters page (repeatable). Frames to it are not held but carry
    /// our clock; our frames to anyone else also wait for its disk (docs/dr.md).
    #[arg(long, value_parser = tern_disk::daemon::parse_gate_peer, requires = "gate_mac")]
    gate_peer: Vec<([u8; 6], PathBuf)>,
    /// A secondary of a protected group: MAC=PATH of another tier's backup (its VM's MAC
    /// and its backup's counter page; repeatable). A logged write is applied to this
    /// volume once the writes of that tier it depends on are applied at its backup.
    #[arg(long, value_parser = tern_disk::daemon::parse_gate_peer, requires = "secondary")]
    backup_peer: Vec<([u8; 6], PathBuf)>,
    /// Publish the counters here: a primary its write and committed counters (for peer
    /// tiers' gates), a secondary the write its volume holds up to (for peer backups).
    #[arg(long)]
    counters: Option<PathBuf>,
    /// zstd level of the replication stream (1 is fastest; see docs/disk.md). The
    /// environment variable TERN_DISK_ZSTD_LEVEL, if set, wins (for benchmarks).
    #[arg(long, default_value_t = tern_disk::primary::DEFAULT_ZSTD_LEVEL)]
    zstd_level: i32,
}

pub fn run(cmd: DiskCmd) -> Result<()> {
    match cmd {
        DiskCmd::Create {
            path,
            size,
            mkfs,
            populate,
        } => {
            let bytes = volume::parse_size(&size).map_err(anyhow::Error::msg)?;
            volume::create(&path, bytes)?;
            if mkfs {
                let mut c = Command::new("mkfs.ext4");
                c.args(["-q", "-F", "-E", "nodiscard"]);
                if let Some(d) = &populate {
                    c.arg("-d").arg(d);
                }
                let out = c.arg(&path).output().context("run mkfs.ext4 (e2fsprogs)")?;
                if !out.status.success() {
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(volume::state_path(&path));
                    bail!(
                        "mkfs.ext4 failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
            let i = volume::info(&path)?;
            println!(
                "created {} ({} bytes, {} MiB allocated)",
                path.display(),
                i.size,
                i.allocated_bytes >> 20
            );
        }
        DiskCmd::Import { src, path } => {
            let size = volume::import(&src, &path)?;
            println!(
                "imported {} as {} ({size} bytes)",
                src.display(),
                path.display()
            );
        }
        DiskCmd::Export { path, dst, format } => {
            volume::export(&path, &dst, &format)?;
            println!(
                "exported {} to {} ({format})",
                path.display(),
                dst.display()
            );
        }
        DiskCmd::Info { path, json } => {
            let i = volume::info(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                println!("volume      {}", i.path.display());
                println!("size        {} bytes ({} MiB)", i.size, i.size >> 20);
                println!("allocated   {} MiB", i.allocated_bytes >> 20);
                println!(
                    "blocks      {} with data, {} zero (64 KiB)",
                    i.data_blocks, i.zero_blocks
                );
                println!("digest      {}", i.digest);
                println!(
                    "state       {}",
                    if i.state.consistent {
                        "consistent"
                    } else {
                        "INCONSISTENT (a sync into it did not complete)"
                    }
                );
            }
        }
        DiskCmd::Verify { a, b, json } => {
            let v = volume::verify(&a, &b)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if v.equal {
                println!(
                    "identical: {} = {} (digest {})",
                    a.display(),
                    b.display(),
                    v.digest_a
                );
            } else {
                println!(
                    "DIFFERENT: sizes {} / {}, {} differing 64 KiB blocks, first at byte {}",
                    v.size_a,
                    v.size_b,
                    v.differing_blocks,
                    v.first_difference.map_or("-".into(), |o| o.to_string())
                );
            }
            if !v.equal {
                bail!("{} and {} differ", a.display(), b.display());
            }
        }
        DiskCmd::Serve(a) => {
            let opts = ServeOptions {
                volume: a.volume.clone(),
                export: a.export.clone(),
                nbd_socket: a.nbd.clone(),
                control_socket: a.control.clone(),
                role: if a.secondary {
                    Role::Secondary
                } else {
                    Role::Primary
                },
                listen: a.listen.clone(),
                replicate: a.node.clone().map(|node| Target {
                    node,
                    peer: a.peer.clone().unwrap_or_default(),
                    target: a.target.clone().unwrap_or_default(),
                }),
                mode: a.mode,
                sync_rate_bps: a.sync_rate * 1_000_000,
                gate: a
                    .gate_nic
                    .clone()
                    .zip(a.switch.clone())
                    .map(|(nic, switch)| tern_disk::server::GateOptions {
                        nic,
                        switch,
                        mac: a.gate_mac,
                        peers: a.gate_peer.clone(),
                    }),
                counters: a.counters.clone(),
                backup_peers: a.backup_peer.clone(),
                zstd_level: std::env::var("TERN_DISK_ZSTD_LEVEL")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(a.zstd_level),
            };
            server::serve(opts, || {
                eprintln!(
                    "tern disk: serving {} as {} on {} (control {})",
                    a.volume.display(),
                    if a.secondary { "secondary" } else { "primary" },
                    a.nbd.display(),
                    a.control.display()
                )
            })
            .map_err(anyhow::Error::msg)?;
        }
        DiskCmd::Ctl { control, command } => {
            let words: Vec<&str> = command.iter().map(String::as_str).collect();
            let req = match words.as_slice() {
                ["status"] => json!({"cmd": "status"}),
                ["mode", m] => {
                    json!({"cmd": "mode", "mode": m.parse::<Mode>().map_err(anyhow::Error::msg)?})
                }
                ["replicate", node, peer, target] => {
                    json!({"cmd": "replicate", "node": node, "peer": peer, "target": target})
                }
                ["replicate", node, peer, target, m] => json!({
                    "cmd": "replicate", "node": node, "peer": peer, "target": target,
                    "mode": m.parse::<Mode>().map_err(anyhow::Error::msg)?
                }),
                ["stop-replication"] => json!({"cmd": "stop-replication"}),
                ["promote"] => json!({"cmd": "promote"}),
                ["promote", "--force"] => json!({"cmd": "promote", "force": true}),
                ["gate", "on"] => json!({"cmd": "gate", "on": true}),
                ["gate", "off"] => json!({"cmd": "gate", "on": false}),
                ["shutdown"] => json!({"cmd": "shutdown"}),
                _ => bail!(
                    "unknown control command {:?} (status, mode M, replicate NODE PEER TARGET [M], \
                     stop-replication, promote [--force], gate on|off, shutdown)",
                    words.join(" ")
                ),
            };
            let v = server::request(&control, &req).map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(())
}
