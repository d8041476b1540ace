//! `tern vm`: guest VMs at a lab site (see `docs/vm.md`).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use tern_vm::vm::{self, Ipv4Cidr, MacAddr, VmSpec};

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Start a VM at a site: QEMU (TCG) inside the site's namespace, state in /run/tern/vm.
    Start(Box<StartArgs>),
    /// Every VM instance with its live state (running, paused, inmigrate, dead, ...).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop every instance of a VM (QMP quit, then SIGKILL) and remove its state.
    Stop { name: String },
    /// Press Alt+SysRq+KEY on the VM's keyboard (QMP send-key): `s` syncs the guest's
    /// filesystems, `u` remounts them read-only (a clean filesystem before `stop`).
    Sysrq {
        name: String,
        #[arg(value_parser = ["s", "u", "b", "o"])]
        key: String,
    },
}

#[derive(Args, Debug)]
pub struct StartArgs {
    /// VM name: 1..=32 of letters, digits, '-' and '_'.
    name: String,
    /// Site to run at (a or b).
    #[arg(long, default_value = "a")]
    site: String,
    /// Guest memory in MiB (QEMU gets 4 KiB more; see docs/vm.md).
    #[arg(long, default_value_t = vm::DEFAULT_MEM_MIB)]
    mem: u32,
    #[arg(long, default_value_t = 1)]
    smp: u32,
    /// Guest workload (`tern.workload=`), or `none` for an idle guest.
    #[arg(long, default_value = "web-db")]
    workload: String,
    /// Workload data set in MiB (default: 70% of --mem).
    #[arg(long)]
    workload_mib: Option<u32>,
    /// Rate at which the workload writes, MB/s (`tern.rate=`).
    #[arg(long)]
    rate: Option<u32>,
    /// Workload seed (`tern.seed=`).
    #[arg(long)]
    seed: Option<u64>,
    /// Guest address, e.g. 198.18.100.20/24 (default: the lowest free from .10).
    #[arg(long)]
    ip: Option<Ipv4Cidr>,
    /// Guest MAC (default: 52:54:00 plus a hash of the name).
    #[arg(long)]
    mac: Option<MacAddr>,
    #[arg(long, default_value = vm::DEFAULT_KERNEL)]
    kernel: PathBuf,
    #[arg(long, default_value = vm::DEFAULT_INITRD)]
    initrd: PathBuf,
    /// Extra kernel command-line words, after tern's own keys.
    #[arg(long, allow_hyphen_values = true)]
    append: Option<String>,
    /// Disk image (raw or qcow2) attached as virtio-blk.
    #[arg(long, conflicts_with = "volume")]
    disk: Option<PathBuf>,
    /// A tern volume (`tern disk create --mkfs`): served by tern over NBD, mounted by the
    /// guest at /mnt/disk, migrated with `tern migrate --with-disk`.
    #[arg(long)]
    volume: Option<PathBuf>,
    /// PipeCloud's output gate (with --volume): frames the guest sends leave only once the
    /// disk writes before them are committed at the volume's secondary (`tern disk ctl
    /// .../disk-ctl.sock replicate ...`); see docs/dr.md.
    #[arg(long, requires = "volume")]
    gate: bool,
    /// With --gate: another gated VM of the same application at this site (a tier, e.g.
    /// the database behind this front end; repeatable). Frames between the tiers are not
    /// held but carry their write counters; frames leaving the group wait for every disk
    /// they depend on.
    #[arg(long = "gate-peer", requires = "gate")]
    gate_peers: Vec<String>,
    /// Switch socket for the guest NIC (default: /run/tern/lab/switch-SITE.sock if it
    /// exists, else no NIC).
    #[arg(long, conflicts_with = "no_net")]
    net: Option<PathBuf>,
    /// No NIC.
    #[arg(long)]
    no_net: bool,
    /// Print the started instance as JSON.
    #[arg(long)]
    json: bool,
}

impl StartArgs {
    fn spec(&self) -> VmSpec {
        let mut s = VmSpec::new(&self.name, &self.site);
        s.mem_mib = self.mem;
        s.smp = self.smp;
        s.workload = (self.workload != "none").then(|| self.workload.clone());
        s.workload_mib = self.workload_mib;
        s.workload_rate_mb_s = self.rate;
        s.seed = self.seed;
        s.ip = self.ip;
        s.mac = self.mac;
        s.kernel = self.kernel.clone();
        s.initrd = self.initrd.clone();
        s.append = self.append.clone();
        s.disk = self.disk.clone();
        s.volume = self
            .volume
            .as_ref()
            .map(|v| std::path::absolute(v).unwrap_or(v.clone()));
        s.gate = self.gate;
        s.gate_peers = self.gate_peers.clone();
        s.net_socket = if self.no_net {
            None
        } else {
            self.net.clone().or_else(|| {
                let sw = tern_lab::switch_socket(&self.site);
                sw.exists().then_some(sw)
            })
        };
        s
    }
}

pub fn run(cmd: VmCmd) -> Result<()> {
    match cmd {
        VmCmd::Start(a) => {
            let spec = a.spec();
            let info = vm::start(&spec)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!(
                    "VM {} {} at site {} (pid {}), {} MiB, {}, {}, NIC: {}",
                    info.name,
                    info.state,
                    info.site,
                    info.pid,
                    info.mem_mib,
                    info.ip.map_or("no IP".into(), |i| i.to_string()),
                    info.mac,
                    spec.net_socket
                        .as_ref()
                        .map_or("none".into(), |p| p.display().to_string()),
                );
                println!("  serial: {}", info.serial_log.display());
                println!("  QMP:    {}", info.qmp_socket.display());
            }
        }
        VmCmd::List { json } => {
            let vms = vm::list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
            } else if vms.is_empty() {
                println!("no VMs");
            } else {
                println!(
                    "{:<16} {:<4} {:<9} {:<12} {:>8} {:>7}  {:<18} MAC",
                    "NAME", "SITE", "ROLE", "STATE", "PID", "MEM", "IP"
                );
                for v in &vms {
                    println!(
                        "{:<16} {:<4} {:<9} {:<12} {:>8} {:>7}  {:<18} {}",
                        v.name,
                        v.site,
                        v.role.to_string(),
                        v.state,
                        v.pid,
                        format!("{}M", v.mem_mib),
                        v.ip.map_or("-".into(), |i| i.to_string()),
                        v.mac
                    );
                }
            }
        }
        VmCmd::Stop { name } => {
            vm::stop(&name)?;
            println!("VM {name} stopped");
        }
        VmCmd::Sysrq { name, key } => {
            let mut q = vm::qmp(&name, None)?;
            q.execute(
                "send-key",
                serde_json::json!({"keys": [
                    {"type": "qcode", "data": "alt"},
                    {"type": "qcode", "data": "sysrq"},
                    {"type": "qcode", "data": key},
                ]}),
            )?;
            println!("VM {name}: Alt+SysRq+{key} sent");
        }
    }
    Ok(())
}
