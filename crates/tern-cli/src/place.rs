//! `tern fingerprint`, `tern place plan` and `tern bench membuddies --sim` (Memory Buddies).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tern_membuddies::estimate::{bloom_size_for_error, what_if};
use tern_membuddies::place::{HostSpec, VmSpec, plan_offline};
use tern_membuddies::reader::{fingerprint_file, fingerprint_process};
use tern_membuddies::{BloomFilter, Fingerprint};

#[derive(Args, Debug)]
pub struct FingerprintArgs {
    /// Raw memory image or memory-backend-file (e.g. /dev/shm/vm-ram). Omit with --pid.
    file: Option<PathBuf>,
    /// Read a process's memory instead (`/proc/PID/mem`; needs ptrace rights).
    #[arg(long, requires_all = ["addr", "len"])]
    pid: Option<u32>,
    /// Virtual address of the guest-RAM mapping (from /proc/PID/maps), hex with 0x or decimal.
    #[arg(long)]
    addr: Option<String>,
    /// Bytes to read at --addr.
    #[arg(long)]
    len: Option<u64>,
    /// Bloom filter target error (fraction of pages) for the reported filter size.
    #[arg(long, default_value_t = 0.002)]
    target_error: f64,
    /// Write the encoded fingerprint (hash list, TMFP v1) here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

fn parse_addr(s: &str) -> Result<u64> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.with_context(|| format!("--addr {s}: not a number"))
}

pub fn fingerprint(a: FingerprintArgs) -> Result<()> {
    if !(1e-6..0.5).contains(&a.target_error) {
        bail!("--target-error takes a fraction in [0.000001, 0.5)");
    }
    let t = Instant::now();
    let (fp, source) = match (&a.file, a.pid) {
        (Some(f), None) => (fingerprint_file(f)?.finish(), f.display().to_string()),
        (None, Some(pid)) => {
            let addr = parse_addr(a.addr.as_deref().unwrap_or_default())?;
            let len = a.len.unwrap_or_default();
            (
                fingerprint_process(pid, addr, len)?.fingerprint(),
                format!("/proc/{pid}/mem@{addr:#x}+{len}"),
            )
        }
        _ => bail!("give a FILE or --pid/--addr/--len (not both)"),
    };
    let secs = t.elapsed().as_secs_f64();
    let sized = bloom_size_for_error(fp.unique_pages().max(1), a.target_error);
    let (bloom_bytes, k) = match sized {
        Some((m, k)) => (Some(BloomFilter::new(m, k)?.encoded_len_bytes()), Some(k)),
        None => (None, None),
    };
    if let Some(out) = &a.out {
        std::fs::write(out, fp.encode()).with_context(|| format!("write {}", out.display()))?;
    }
    let v = serde_json::json!({
        "source": source, "pages": fp.pages_total(), "unique": fp.unique_pages(),
        "self_shared": fp.self_shared_pages(), "zero": fp.zero_pages(),
        "hash_list_bytes": fp.encoded_len_bytes(), "bloom_bytes": bloom_bytes, "bloom_k": k,
        "bloom_target_error": a.target_error, "seconds": secs,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{source}: {} pages, {} unique, {} self-shared ({} zero); hash list {} B, Bloom {} (k={}, {:.2}% error); {secs:.3} s",
            fp.pages_total(),
            fp.unique_pages(),
            fp.self_shared_pages(),
            fp.zero_pages(),
            fp.encoded_len_bytes(),
            bloom_bytes.map_or("unreachable (too few pages)".into(), |b| format!("{b} B")),
            k.map_or("-".into(), |k| k.to_string()),
            a.target_error * 100.0
        );
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum PlaceCmd {
    /// Offline planner: hosts + VMs (+ fingerprints) -> placement, expected memory, sharing.
    /// Input JSON: {"hosts":[{"name","capacity_pages"}],
    /// "vms":[{"name","fingerprint": "FILE.tmfp"} | {"name","image": "RAW"}]}.
    Plan {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(serde::Deserialize)]
struct PlanInput {
    hosts: Vec<HostSpec>,
    vms: Vec<PlanVm>,
}

#[derive(serde::Deserialize)]
struct PlanVm {
    name: String,
    fingerprint: Option<PathBuf>,
    image: Option<PathBuf>,
}

/// Most VMs one plan input may list.
const MAX_PLAN_VMS: usize = 100_000;

pub fn run(c: PlaceCmd) -> Result<()> {
    let PlaceCmd::Plan { input, json } = c;
    let text =
        std::fs::read_to_string(&input).with_context(|| format!("read {}", input.display()))?;
    let inp: PlanInput =
        serde_json::from_str(&text).with_context(|| format!("parse {}", input.display()))?;
    if inp.vms.len() > MAX_PLAN_VMS {
        bail!("{} VMs, at most {MAX_PLAN_VMS}", inp.vms.len());
    }
    let base = input.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    let mut vms = Vec::new();
    for v in inp.vms {
        let fp = match (&v.fingerprint, &v.image) {
            (Some(f), None) => {
                let p = base.join(f);
                let b = std::fs::read(&p).with_context(|| format!("read {}", p.display()))?;
                Fingerprint::decode(&b).with_context(|| format!("VM {}", v.name))?
            }
            (None, Some(i)) => fingerprint_file(&base.join(i))?.finish(),
            _ => bail!("VM {}: give exactly one of fingerprint / image", v.name),
        };
        vms.push(VmSpec {
            name: v.name,
            fingerprint: fp,
        });
    }
    let all = what_if(vms.iter().map(|v| &v.fingerprint));
    let hosts = inp.hosts.clone();
    let names: Vec<String> = vms.iter().map(|v| v.name.clone()).collect();
    let plan = plan_offline(inp.hosts, vms);
    if json {
        let v = serde_json::json!({"plan": plan, "what_if_all_together": all,
            "hosts": hosts, "vms": names});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for (i, n) in names.iter().enumerate() {
        match plan.assignment[i] {
            Some(h) => println!("{n} -> {}", hosts[h].name),
            None => println!("{n} -> (fits nowhere)"),
        }
    }
    for (h, p) in plan.host_pages.iter().enumerate() {
        println!("{}: {p} / {} pages", hosts[h].name, hosts[h].capacity_pages);
    }
    println!(
        "memory {} pages (unshared {}), sharing rate {:.1}%, unplaced {}",
        plan.total_pages_predicted,
        plan.total_pages_unshared,
        plan.sharing_rate * 100.0,
        plan.unplaced
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct MembuddiesBenchArgs {
    /// Run the simulated experiments (no VMs).
    #[arg(long)]
    sim: bool,
    /// Monte-Carlo pairs per Fig. 4.3 point.
    #[arg(long, default_value_t = 10)]
    trials: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// MiB hashed for the cost-per-GiB figure.
    #[arg(long, default_value_t = 1024)]
    hash_mib: usize,
    /// Seeds of the 100-host simulation.
    #[arg(long, default_value_t = 3)]
    sim_seeds: usize,
    /// Pages per simulated VM (scaled down).
    #[arg(long, default_value_t = 1024)]
    sim_vm_pages: u64,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

pub fn bench(a: MembuddiesBenchArgs) -> Result<()> {
    if !a.sim {
        bail!("only --sim is implemented (KSM ground truth needs guests in the lab)");
    }
    if !(1..=1000).contains(&a.trials)
        || !(1..=8192).contains(&a.hash_mib)
        || !(1..=100).contains(&a.sim_seeds)
        || !(64..=1 << 20).contains(&a.sim_vm_pages)
    {
        bail!(
            "--trials 1..=1000, --hash-mib 1..=8192, --sim-seeds 1..=100, --sim-vm-pages 64..=1048576"
        );
    }
    let opts = tern_bench::membuddies::MembuddiesBenchOptions {
        out_dir: a.out,
        trials: a.trials,
        seed: a.seed,
        hash_mib: a.hash_mib,
        sim_seeds: a.sim_seeds,
        sim_vm_pages: a.sim_vm_pages,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let r = tern_bench::membuddies::run(&opts)?;
    println!(
        "fig4.3 met: {}, table4.4 met: {}, estimation met: {}, hashing {:.3} s/GiB, 100-host gain {:+.1}%",
        r["fig4_3"]["met"],
        r["table4_4"]["met"],
        r["estimation_1gib"]["met"],
        r["hashing"]["seconds_per_gib"].as_f64().unwrap_or(0.0),
        r["sim_100_hosts"]["aware_grouping_gain"]
            .as_f64()
            .unwrap_or(0.0)
            * 100.0
    );
    println!(
        "wrote {}/membuddies-sim.{{json,md}}",
        opts.out_dir.display()
    );
    Ok(())
}
