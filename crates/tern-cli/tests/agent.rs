//! End-to-end test of the site agent in the lab: site b asks site a's agent, through b's
//! node and the authenticated transport, for commands of the lab's allow-list
//! (`tern_lab::LAB_AGENT_COMMANDS`) and gets answers; a command outside it (`vm.stop`) is
//! refused with a clear error, a's refusal counter moves and the VM keeps running. Needs
//! root (skips otherwise, except under CI=true).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{is_root, json, lock, ok, tern};
use serde_json::Value;
use tern_vm::{testkernel, vm};

const NAME: &str = "agent1";

struct Cleanup {
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = tern(&["vm", "stop", NAME]);
        let _ = tern(&["lab", "down"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn node_config(site: &str) -> String {
    tern_lab::node_control_socket(site)
        .with_extension("toml")
        .display()
        .to_string()
}

fn agent_refused(site: &str) -> u64 {
    let st = json(&["node", "status", "--config", &node_config(site), "--json"]);
    st["agent"]["refused"]
        .as_u64()
        .expect("agent counters in the status")
}

fn running_at_a(list: &Value) -> bool {
    list.as_array().is_some_and(|l| {
        l.iter()
            .any(|v| v["name"] == NAME && v["site"] == "a" && v["state"] == "running")
    })
}

#[test]
fn a_peer_site_gets_its_allowed_agent_commands_and_is_refused_the_rest() {
    if !is_root() {
        return;
    }
    let _g = lock();
    ok(&["lab", "down"]);
    let dir = std::env::temp_dir().join(format!("tern-agent-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _c = Cleanup { dir: dir.clone() };
    ok(&["lab", "up", "--profile", "baseline"]);
    let (cfg_a, cfg_b) = (node_config("a"), node_config("b"));
    assert!(
        std::fs::read_to_string(&cfg_a)
            .unwrap()
            .contains("agent = [\"vm.list\""),
        "the lab grants its peers an agent allow-list"
    );

    // A VM at site a (the multiboot test kernel: no guest build needed).
    let kernel = dir.join("kernel.bin");
    let initrd = dir.join("initrd.img");
    std::fs::write(&kernel, testkernel::multiboot_image("agent e2e up\n")).unwrap();
    std::fs::write(&initrd, b"unused\n").unwrap();
    ok(&[
        "vm",
        "start",
        NAME,
        "--site",
        "a",
        "--mem",
        "64",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--no-net",
        "--workload",
        "none",
    ]);

    // From b, relayed to a: vm.list and vm.status answer with a's instance.
    let prefix = [
        "agent",
        "call",
        "--config",
        cfg_b.as_str(),
        "--site",
        "site-a",
    ];
    let call_a = |args: &[&'static str]| -> Vec<String> {
        prefix.iter().chain(args).map(|s| s.to_string()).collect()
    };

    let list: Value = json(&strs(&call_a(&["--json", "vm.list"])));
    let vms = &list["ok"]["vms"];
    assert!(running_at_a(vms), "{list}");
    let st: Value = json(&strs(&call_a(&["--json", "vm.status", NAME])));
    assert_eq!(st["ok"]["vm"]["state"], "running", "{st}");
    assert_eq!(st["ok"]["vm"]["mem_mib"], 64, "{st}");
    let human = ok(&strs(&call_a(&["vm.status", NAME])));
    assert!(human.contains("running at site a"), "{human}");
    // Not found is an answer too, not a hang.
    let out = tern(&strs(&call_a(&["vm.status", "nope"])));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not_found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Outside b's allow-list at a: refused with a clear error, counted, VM untouched.
    let before = agent_refused("a");
    let out = tern(&strs(&call_a(&["vm.stop", NAME])));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "vm.stop from b must fail");
    assert!(
        err.contains("refused") && err.contains("vm.stop") && err.contains("allow-list"),
        "{err}"
    );
    assert_eq!(agent_refused("a"), before + 1);
    std::thread::sleep(Duration::from_millis(500));
    let list = json(&["vm", "list", "--json"]);
    assert!(running_at_a(&list), "the VM keeps running: {list}");
    let pid = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == NAME)
        .unwrap()["pid"]
        .as_u64()
        .unwrap() as u32;
    let qmp = vm::InstancePaths::new(std::path::Path::new(vm::VM_RUN_DIR), NAME, "a").qmp_socket;
    assert!(vm::pid_alive(pid, &qmp));

    // The other way round: a asks b (nothing runs there).
    let out = ok(&[
        "agent", "call", "--config", &cfg_a, "--site", "site-b", "vm.list",
    ]);
    assert!(out.contains("no VMs"), "{out}");

    // A local caller at a may call everything: vm.stop from a's own control socket.
    let start = Instant::now();
    let out = ok(&["agent", "call", "--config", &cfg_a, "vm.stop", NAME]);
    assert!(out.contains("stopped at site a"), "{out}");
    assert!(start.elapsed() < Duration::from_secs(30));
    let list = json(&["vm", "list", "--json"]);
    assert!(!running_at_a(&list), "{list}");
}
