//! `tern bench membuddies --sim`: Memory Buddies' pure experiments on `tern-membuddies`,
//! no VMs: Bloom estimate error vs filter size (Fig. 4.3), filter sizes for 0.2% error at
//! 1/4/8 GiB (Table 4.4), estimation time and bytes against hash lists (Fig. 4.9b / §4.7.6),
//! page-hashing cost per GiB, and the 100-host placement simulation (§4.7.3).
//! Writes `membuddies-sim.{json,md}`.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::{Value, json};
use tern_membuddies::estimate::{bloom_shared, bloom_size_for_error, exact_shared};
use tern_membuddies::rng::SplitMix64;
use tern_membuddies::sim::{Policy, SimParams, simulate};
use tern_membuddies::{BloomFilter, FingerprintBuilder, PAGE_SIZE_BYTES};

use crate::BenchError;

#[derive(Debug, Clone)]
pub struct MembuddiesBenchOptions {
    pub out_dir: PathBuf,
    /// Monte-Carlo pairs per Fig. 4.3 point.
    pub trials: usize,
    pub seed: u64,
    /// Synthetic buffer hashed for the cost-per-GiB figure.
    pub hash_mib: usize,
    /// Seeds of the 100-host simulation.
    pub sim_seeds: usize,
    /// Pages per simulated VM (scaled down; results are fractions).
    pub sim_vm_pages: u64,
    pub command: String,
}

/// Pages per GiB.
const PAGES_PER_GIB: u64 = (1 << 30) / PAGE_SIZE_BYTES as u64;
/// Fig. 4.3 filter sizes, as a fraction of the seed's 32-bit hash list.
const FIG43_FRACTIONS: [f64; 6] = [0.01, 0.02, 0.05, 0.10, 0.20, 0.40];
/// Fig. 4.3 VM sizes (MiB).
const FIG43_MIB: [u64; 3] = [256, 512, 1024];
/// Common fraction of pages in the Fig. 4.3 pairs.
const FIG43_OVERLAP: f64 = 0.3;
/// Table 4.4 as printed: (GiB, hash list KB, Bloom KB at 0.2% error).
const TABLE44: [(u64, u64, u64); 3] = [(1, 1024, 92), (4, 4096, 124), (8, 8192, 368)];
/// Timing repetitions (median reported).
const TIMING_RUNS: usize = 5;

fn pair(seed: u64, n: u64, c: u64) -> (Vec<u64>, Vec<u64>) {
    let mut r = SplitMix64::new(seed);
    let common: Vec<u64> = (0..c).map(|_| r.next_u64()).collect();
    let mut a: Vec<u64> = (0..n - c)
        .map(|_| r.next_u64())
        .chain(common.iter().copied())
        .collect();
    let mut b: Vec<u64> = (0..n - c).map(|_| r.next_u64()).chain(common).collect();
    a.sort_unstable();
    b.sort_unstable();
    (a, b)
}

fn bloom(keys: &[u64], m: u64, k: u8) -> Result<BloomFilter, BenchError> {
    BloomFilter::from_hashes(keys, m, k).map_err(|e| fail(e.to_string()))
}

fn fail(detail: impl Into<String>) -> BenchError {
    BenchError::Failed {
        tool: "bench membuddies",
        detail: detail.into(),
    }
}

/// RMSE (fraction of pages) and max error of the Bloom estimate over `trials` pairs;
/// `None` when a filter saturates (too small for any estimate).
fn mc_error(
    seed: u64,
    n: u64,
    c: u64,
    m: u64,
    k: u8,
    trials: usize,
) -> Result<Option<(f64, f64)>, BenchError> {
    let mut sq = 0.0;
    let mut max: f64 = 0.0;
    for t in 0..trials {
        let (a, b) = pair(seed ^ (t as u64) << 32 ^ n, n, c);
        let Ok(est) = bloom_shared(&bloom(&a, m, k)?, &bloom(&b, m, k)?) else {
            return Ok(None);
        };
        let e = (est - c as f64) / n as f64;
        sq += e * e;
        max = max.max(e.abs());
    }
    Ok(Some(((sq / trials as f64).sqrt(), max)))
}

fn median_ms(mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..TIMING_RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(o: &MembuddiesBenchOptions) -> Result<Value, BenchError> {
    // Fig. 4.3.
    let mut fig43 = Vec::new();
    for &mib in &FIG43_MIB {
        let n = mib * 256;
        let c = (FIG43_OVERLAP * n as f64) as u64;
        for &frac in &FIG43_FRACTIONS {
            let m = ((frac * 32.0 * n as f64) as u64).max(64);
            for k in [1u8, 2] {
                let e = mc_error(o.seed, n, c, m, k, o.trials)?;
                fig43.push(json!({"vm_mib": mib, "frac_of_32bit_list": frac,
                    "bits_per_page": m as f64 / n as f64, "k": k,
                    "rmse_pct": e.map(|x| x.0 * 100.0), "max_err_pct": e.map(|x| x.1 * 100.0),
                    "saturated": e.is_none()}));
            }
        }
    }
    let at5: Vec<f64> = fig43
        .iter()
        .filter(|r| r["frac_of_32bit_list"] == 0.05 && r["k"] == 1)
        .map(|r| r["rmse_pct"].as_f64().unwrap_or(f64::MAX))
        .collect();
    let fig43_ok = at5.iter().all(|&e| e <= 0.5);

    // Table 4.4.
    let mut t44 = Vec::new();
    let mut t44_ok = true;
    for &(gib, list_kb, seed_kb) in &TABLE44 {
        let n = gib * PAGES_PER_GIB;
        let (m, k) = bloom_size_for_error(n, 0.002).ok_or_else(|| fail("0.2% unreachable"))?;
        let kb = m.div_ceil(8) as f64 / 1024.0;
        // Monte-Carlo check at our size, 30% overlap, few pairs (big sets).
        let trials = if gib > 1 { 2 } else { 4 };
        let (rmse, max) = mc_error(o.seed ^ 0x44, n, (0.3 * n as f64) as u64, m, k, trials)?
            .ok_or_else(|| fail(format!("{gib} GiB filter saturated")))?;
        t44_ok &= kb <= seed_kb as f64;
        t44.push(json!({"ram_gib": gib, "hash_list_kb_seed_32bit": list_kb,
            "hash_list_kb_ours_64bit": list_kb * 2, "bloom_kb_seed": seed_kb, "bloom_kb_ours": kb,
            "k": k, "bits_per_page": m as f64 / n as f64, "mc_rmse_pct": rmse * 100.0,
            "mc_max_err_pct": max * 100.0, "no_larger": kb <= seed_kb as f64}));
    }

    // Time and bytes for a 1 GiB pair: sorted-list merge vs Bloom (5% and 0.2%-error sizes).
    let n = PAGES_PER_GIB;
    let (a, b) = pair(o.seed ^ 0x77, n, n * 3 / 10);
    let list_ms = median_ms(|| {
        black_box(exact_shared(black_box(&a), black_box(&b)));
    });
    let mut timing = vec![json!({"method": "sorted hash lists (merge)", "ms": list_ms,
        "bytes": 8 * n, "bytes_seed_32bit": 4 * n})];
    let mut speedups = Vec::new();
    let (m02, k02) = bloom_size_for_error(n, 0.002).ok_or_else(|| fail("0.2% unreachable"))?;
    for (label, m, k) in [
        ("bloom 5% of 32-bit list", (1.6 * n as f64) as u64, 1u8),
        ("bloom at 0.2% error", m02, k02),
    ] {
        let fa = bloom(&a, m, k)?;
        let fb = bloom(&b, m, k)?;
        let ms = median_ms(|| {
            black_box(bloom_shared(black_box(&fa), black_box(&fb)).ok());
        });
        let bytes = fa.encoded_len_bytes() as u64;
        speedups.push((list_ms / ms, 1.0 - bytes as f64 / (4 * n) as f64));
        timing.push(json!({"method": label, "ms": ms, "bytes": bytes, "k": k,
            "speedup_vs_lists": list_ms / ms,
            "bytes_saved_vs_32bit_list": 1.0 - bytes as f64 / (4 * n) as f64,
            "bytes_saved_vs_64bit_list": 1.0 - bytes as f64 / (8 * n) as f64}));
    }
    let time_ok = speedups.iter().all(|&(s, saved)| s >= 10.0 && saved > 0.9);

    // Hashing cost per GiB (synthetic buffer: a quarter zero pages, the rest random).
    let mut buf = vec![0u8; o.hash_mib << 20];
    let mut r = SplitMix64::new(o.seed);
    for (i, p) in buf.chunks_exact_mut(PAGE_SIZE_BYTES).enumerate() {
        if i % 4 != 0 {
            for w in p.chunks_exact_mut(8) {
                w.copy_from_slice(&r.next_u64().to_le_bytes());
            }
        }
    }
    let t = Instant::now();
    let mut fb = FingerprintBuilder::new();
    fb.push_bytes(&buf);
    let fp = fb.finish();
    let hash_s = t.elapsed().as_secs_f64();
    drop(buf);
    let s_per_gib = hash_s * 1024.0 / o.hash_mib as f64;

    // 100-host simulation.
    let mut sims = Vec::new();
    let mut ratio_sum = 0.0;
    for s in 0..o.sim_seeds {
        let p = SimParams::seed_like(o.seed + s as u64, o.sim_vm_pages);
        let mut row = json!({"seed": o.seed + s as u64});
        let mut ff = 0usize;
        for pol in [
            Policy::FirstFit,
            Policy::AwareExact,
            Policy::AwareGrouping,
            Policy::AwareBloom,
        ] {
            let r = simulate(&p, pol);
            if pol == Policy::FirstFit {
                ff = r.vms_placed;
            }
            if pol == Policy::AwareGrouping {
                ratio_sum += r.vms_placed as f64 / ff.max(1) as f64;
            }
            row[format!("{pol:?}")] = json!({"vms": r.vms_placed, "sharing_rate": r.sharing_rate});
        }
        sims.push(row);
    }
    let sim_gain = ratio_sum / o.sim_seeds.max(1) as f64 - 1.0;
    let params = SimParams::seed_like(o.seed, o.sim_vm_pages);

    let result = json!({
        "command": o.command, "machine": crate::machine(),
        "fig4_3": {"overlap": FIG43_OVERLAP, "trials": o.trials, "rows": fig43,
            "target": "RMSE <= 0.5% of pages at 5% of the (32-bit) hash list", "met": fig43_ok},
        "table4_4": {"rows": t44, "target": "no larger than the seed's sizes", "met": t44_ok},
        "estimation_1gib": {"rows": timing, "target": ">= 10x faster, > 90% fewer bytes", "met": time_ok},
        "hashing": {"mib": o.hash_mib, "seconds": hash_s, "seconds_per_gib": s_per_gib,
            "pages": fp.pages_total(), "unique": fp.unique_pages(), "zero": fp.zero_pages()},
        "sim_100_hosts": {"params": params, "runs": sims, "aware_grouping_gain": sim_gain,
            "seed_reference": {"aware": 469, "first_fit": 406, "gain": 469.0 / 406.0 - 1.0},
            "target": ">= 16% more VMs", "met": sim_gain >= 0.16},
    });

    let mut md = String::new();
    let _ = writeln!(md, "# Memory Buddies, simulated (`{}`)\n", o.command);
    let _ = writeln!(
        md,
        "## Fig. 4.3: estimate RMSE (% of pages) vs filter size, {:.0}% overlap, {} pairs\n",
        FIG43_OVERLAP * 100.0,
        o.trials
    );
    let _ = writeln!(
        md,
        "| VM | size (× 32-bit list) | bits/page | k | RMSE % | max % |\n|---|---|---|---|---|---|"
    );
    for r in &fig43 {
        let pct = |v: &Value| {
            v.as_f64()
                .map_or("saturated".to_string(), |x| format!("{x:.3}"))
        };
        let _ = writeln!(
            md,
            "| {} MiB | {:.0}% | {:.2} | {} | {} | {} |",
            r["vm_mib"],
            r["frac_of_32bit_list"].as_f64().unwrap_or(0.0) * 100.0,
            r["bits_per_page"].as_f64().unwrap_or(0.0),
            r["k"],
            pct(&r["rmse_pct"]),
            pct(&r["max_err_pct"])
        );
    }
    let _ = writeln!(
        md,
        "\nTarget ≤ 0.5% at 5%: **{}**\n",
        if fig43_ok { "met" } else { "NOT met" }
    );
    let _ = writeln!(
        md,
        "## Table 4.4: filter size for 0.2% error (sized by the delta-method RMSE, worst overlap)\n"
    );
    let _ = writeln!(
        md,
        "| RAM | list KB (32-bit / ours 64-bit) | seed Bloom KB | ours KB | k | MC RMSE % | no larger |\n|---|---|---|---|---|---|---|"
    );
    for r in &t44 {
        let _ = writeln!(
            md,
            "| {} GiB | {} / {} | {} | {:.1} | {} | {:.3} | {} |",
            r["ram_gib"],
            r["hash_list_kb_seed_32bit"],
            r["hash_list_kb_ours_64bit"],
            r["bloom_kb_seed"],
            r["bloom_kb_ours"].as_f64().unwrap_or(0.0),
            r["k"],
            r["mc_rmse_pct"].as_f64().unwrap_or(0.0),
            r["no_larger"]
        );
    }
    let _ = writeln!(
        md,
        "\n## Estimation for a 1 GiB pair\n\n| method | ms | bytes | speed-up | bytes saved vs 32-bit list |\n|---|---|---|---|---|"
    );
    for r in &timing {
        let _ = writeln!(
            md,
            "| {} | {:.3} | {} | {:.1}× | {:.1}% |",
            r["method"].as_str().unwrap_or(""),
            r["ms"].as_f64().unwrap_or(0.0),
            r["bytes"],
            r["speedup_vs_lists"].as_f64().unwrap_or(1.0),
            r["bytes_saved_vs_32bit_list"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    let _ = writeln!(
        md,
        "\nTarget ≥ 10× and > 90% fewer bytes: **{}**\n",
        if time_ok { "met" } else { "NOT met" }
    );
    let _ = writeln!(
        md,
        "## Hashing\n\n{} MiB in {:.3} s: **{:.3} s/GiB** ({} pages, {} unique, {} zero)\n",
        o.hash_mib,
        hash_s,
        s_per_gib,
        fp.pages_total(),
        fp.unique_pages(),
        fp.zero_pages()
    );
    let _ = writeln!(
        md,
        "## 100 hosts, synthetic images (seed: 469 vs 406, +16%)\n\n| seed | first-fit | seed rule (max sharing) | grouping | grouping on Bloom 1.6 b/page |\n|---|---|---|---|---|"
    );
    for r in &sims {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            r["seed"],
            r["FirstFit"]["vms"],
            r["AwareExact"]["vms"],
            r["AwareGrouping"]["vms"],
            r["AwareBloom"]["vms"]
        );
    }
    let _ = writeln!(
        md,
        "\nMean gain of grouping over first-fit: **{:+.1}%** (target +16%: {})",
        sim_gain * 100.0,
        if sim_gain >= 0.16 { "met" } else { "NOT met" }
    );
    crate::write_results(&o.out_dir, "membuddies-sim", &result, &md)?;
    Ok(result)
}
