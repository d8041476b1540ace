//! `tern node` as an operator runs it: default config path, `check`, completions and man
//! pages, and a real node process on loopback that tells a service manager when it is ready
//! (`NOTIFY_SOCKET`) and reloads its peers on SIGHUP and `tern node reload` without dropping
//! the sessions the reload does not touch. Loopback only: no lab, no namespaces.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tern(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env_remove("TERN_NODE_CONFIG")
        .output()
        .expect("run tern")
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tern-node-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn completions_and_man_pages_cover_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = tern(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        for word in ["node", "migrate", "reload", "keygen", "config"] {
            assert!(text.contains(word), "{shell} completion lacks {word}");
        }
    }
    assert!(!tern(&["completions", "tcsh"]).status.success());
    let d = tmp("man");
    let out = tern(&["man", d.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "tern.1",
        "tern-node.1",
        "tern-node-run.1",
        "tern-node-reload.1",
        "tern-migrate.1",
    ] {
        let text = std::fs::read_to_string(d.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
    }
    let run = std::fs::read_to_string(d.join("tern-node-run.1")).unwrap();
    assert!(
        run.contains("/etc/tern/node.toml") && run.contains("SIGHUP"),
        "{run}"
    );
    let top = std::fs::read_to_string(d.join("tern.1")).unwrap();
    assert!(
        top.contains("tern\\-node(1)") || top.contains("node"),
        "{top}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn without_config_the_node_names_the_path_it_read() {
    let out = tern(&["node", "run"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/etc/tern/node.toml") && err.contains("TERN_NODE_CONFIG"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["node", "check", "--json"])
        .env("TERN_NODE_CONFIG", "/nonexistent/tern/n.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["ok"], false);
    assert_eq!(j["config"], "/nonexistent/tern/n.toml");
}

/// A free loopback UDP port (and TCP for `tcp`), released for the node to bind.
fn free_port(tcp: bool) -> u16 {
    if tcp {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

fn keygen(dir: &Path, name: &str) -> String {
    let out = tern(&[
        "keygen",
        "--out",
        dir.join(format!("{name}.key")).to_str().unwrap(),
    ]);
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

struct Site {
    name: &'static str,
    port: u16,
    public: String,
}

/// `[[peer]]` sections: (site, extra lines).
fn config(dir: &Path, me: &Site, listen_port: u16, peers: &[(&Site, &str)], tail: &str) -> String {
    let mut t = format!(
        "[node]\nname = \"{}\"\nprivate_key_file = \"{}\"\nlisten = \"127.0.0.1:{listen_port}\"\n\
         control = \"{}\"\n",
        me.name,
        dir.join(format!("{}.key", me.name)).display(),
        dir.join(format!("{}.sock", me.name)).display()
    );
    for (p, extra) in peers {
        t.push_str(&format!(
            "[[peer]]\nname = \"{}\"\npublic_key = \"{}\"\naddress = \"127.0.0.1:{}\"\n{extra}\n",
            p.name, p.public, p.port
        ));
    }
    t.push_str(tail);
    t
}

/// Node processes this test started, killed by their pid at the end.
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(cfg: &Path, notify: Option<&Path>) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tern"));
    c.args(["node", "run", "--config", cfg.to_str().unwrap()])
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(n) = notify {
        c.env("NOTIFY_SOCKET", n);
    }
    c.spawn().expect("start tern node")
}

fn status(cfg: &Path) -> Option<serde_json::Value> {
    let out = tern(&[
        "node",
        "status",
        "--json",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn connected(st: &serde_json::Value, peer: &str) -> bool {
    st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == peer && p["connected"] == true)
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn notification(sock: &UnixDatagram) -> String {
    let mut b = [0u8; 1024];
    let n = sock
        .recv(&mut b)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&b[..n]).into_owned()
}

fn echo(conn: &mut TcpStream, msg: &[u8]) {
    conn.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    conn.read_exact(&mut got)
        .expect("the relayed connection still works");
    assert_eq!(got, msg);
}

#[test]
fn a_running_node_reloads_its_peers_and_keeps_the_others_sessions() {
    let d = tmp("reload");
    let a = Site {
        name: "a",
        port: free_port(false),
        public: keygen(&d, "a"),
    };
    let b = Site {
        name: "b",
        port: free_port(false),
        public: keygen(&d, "b"),
    };
    let c = Site {
        name: "c",
        port: free_port(false),
        public: keygen(&d, "c"),
    };
    // An echo server that b's node connects to on a's behalf.
    let echo_srv = TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_port = echo_srv.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in echo_srv.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let fwd = free_port(true);
    let forward = format!(
        "[[forward]]\nlisten = \"127.0.0.1:{fwd}\"\npeer = \"b\"\ntarget = \"127.0.0.1:{echo_port}\"\n"
    );
    let (a_cfg, b_cfg, c_cfg) = (d.join("a.toml"), d.join("b.toml"), d.join("c.toml"));
    let write_a = |peers: &[(&Site, &str)], listen: u16, a: &Site| {
        std::fs::write(&a_cfg, config(&d, a, listen, peers, &forward)).unwrap();
    };
    write_a(&[(&b, "")], a.port, &a);
    let tcp_ok = "tcp_targets = [\"127.0.0.1/32\"]";
    std::fs::write(&b_cfg, config(&d, &b, b.port, &[(&a, tcp_ok)], "")).unwrap();
    std::fs::write(&c_cfg, config(&d, &c, c.port, &[(&a, "")], "")).unwrap();
    let check = tern(&["node", "check", "--config", a_cfg.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    let notify_path = d.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut nodes = Nodes(vec![start(&a_cfg, Some(&notify_path)), start(&b_cfg, None)]);
    let ready = notification(&notify);
    assert!(
        ready.starts_with("READY=1\nSTATUS=listening on udp 127.0.0.1:"),
        "{ready}"
    );
    // READY came after the control socket listened: status answers at once.
    assert!(status(&a_cfg).is_some(), "control socket not up at READY=1");
    wait_for("a connected to b", || {
        status(&a_cfg).is_some_and(|s| connected(&s, "b"))
    });
    let mut conn = TcpStream::connect(("127.0.0.1", fwd)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    echo(&mut conn, b"before any reload");

    // SIGHUP: c added, b's grants changed. b's session and the connection over it stay.
    nodes.0.push(start(&c_cfg, None));
    write_a(&[(&b, "allow = [\"migration\"]"), (&c, "")], a.port, &a);
    let pid = nodes.0[0].id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(notification(&notify).starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert!(notification(&notify).starts_with("READY=1\n"));
    let st = status(&a_cfg).unwrap();
    assert_eq!(st["reload"]["applied"], 1, "{}", st["reload"]);
    assert_eq!(
        st["reload"]["last"], "peer b new grants; peer c added",
        "{}",
        st["reload"]
    );
    wait_for("a connected to c", || {
        status(&a_cfg).is_some_and(|s| connected(&s, "c"))
    });
    echo(&mut conn, b"after adding c");
    assert!(connected(&status(&a_cfg).unwrap(), "b"));

    // A change that needs a restart is refused by name; the old config stays.
    let moved = free_port(false);
    write_a(&[(&b, ""), (&c, "")], moved, &a);
    let out = tern(&[
        "node",
        "reload",
        "--socket",
        d.join("a.sock").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("need a restart") && err.contains("node.listen"),
        "{err}"
    );
    // So is a file that does not parse.
    std::fs::write(&a_cfg, "[node\nname = ").unwrap();
    let out = tern(&[
        "node",
        "reload",
        "--socket",
        d.join("a.sock").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid") && err.contains("a.toml"), "{err}");
    let st = status(&b_cfg).unwrap();
    assert!(connected(&st, "a"));
    echo(&mut conn, b"after two refused reloads");

    // c removed over the control socket; b untouched.
    write_a(&[(&b, "")], a.port, &a);
    let out = tern(&["node", "reload", "--config", a_cfg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "reloaded: peer b new grants; peer c removed"
    );
    let st = status(&a_cfg).unwrap();
    let names: Vec<&str> = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b"]);
    assert_eq!(st["reload"]["applied"], 2);
    assert_eq!(st["reload"]["refused"], 2);
    echo(&mut conn, b"after removing c");

    // A new key for b ends b's session, and with it the connection relayed over it.
    let other = keygen(&d, "b2");
    let rekeyed = Site {
        name: "b",
        port: b.port,
        public: other,
    };
    write_a(&[(&rekeyed, "")], a.port, &a);
    let out = tern(&["node", "reload", "--config", a_cfg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut buf = [0u8; 16];
    let _ = conn.write_all(b"x");
    assert!(
        matches!(conn.read(&mut buf), Ok(0) | Err(_)),
        "the flow over the old session was reset"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !connected(&status(&a_cfg).unwrap(), "b"),
        "b's old key no longer connects"
    );

    // SIGTERM: STOPPING=1.
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut last = String::new();
    for _ in 0..20 {
        last = notification(&notify);
        if last.starts_with("STOPPING=1") {
            break;
        }
    }
    assert!(last.starts_with("STOPPING=1"), "{last}");
    let a_exit = nodes.0[0].wait().unwrap();
    assert!(a_exit.success(), "{a_exit:?}");
    drop(nodes);
    let _ = std::fs::remove_dir_all(&d);
}
